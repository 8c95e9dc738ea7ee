"""pemn models (being written)."""
