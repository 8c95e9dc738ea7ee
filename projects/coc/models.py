"""coc models (being written)."""
