"""tokensynth-jax: TokenSynth in JAX/Flax (see README.md)."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tokensynth-jax")
except _metadata.PackageNotFoundError:  # a checkout run without installing it (the benchmarks on a device)
    __version__ = "0+unknown"
