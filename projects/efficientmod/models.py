"""efficientmod models (being written)."""
