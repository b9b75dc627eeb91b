"""Experiment configs (`get_config(arg)` -> ConfigDict); installed as `tokensynth_jax.configs`, so `--config tiny` works anywhere."""
