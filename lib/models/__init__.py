"""Models used by several projects: the LLaMA-family decoder (Mask Fine-Tuning, SoupLM) and the
DINOv2-style ViT (Proteus)."""
