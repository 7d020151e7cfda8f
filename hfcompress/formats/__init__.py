"""On-disk formats: checking our native safetensors checkpoints (exports come later)."""
