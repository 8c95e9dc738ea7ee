"""fcvit models (being written)."""
