"""Checkpoints: safetensors headers, ranged reads, compatibility checks, the staged output."""
