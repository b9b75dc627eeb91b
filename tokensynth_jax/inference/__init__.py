"""Sampling with a KV cache, timbres, synthesis to audio and `jax.export` of the generation loop."""
