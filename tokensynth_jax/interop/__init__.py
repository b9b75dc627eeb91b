"""Checkpoint formats of others: the official PyTorch package, safetensors, descript DAC, LAION CLAP."""
