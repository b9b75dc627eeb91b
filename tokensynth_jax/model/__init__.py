"""The TokenSynth decoder in Flax NNX: layers and the transformer (no trainer, no torch, no CLI)."""
