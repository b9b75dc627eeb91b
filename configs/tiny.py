"""A tiny TokenSynth for tests and the offline demo: 2 x 64, 4 heads, 4 codebooks of 64.

Its codec is data_prep's `tiny-encodec` preset (transformers codecs need power-of-two codebooks).
Not a model that makes music.

  tokensynth init --config configs/tiny.py runs/tiny-random
"""
from tokensynth_jax.configs import reference


def get_config(arg=None):
    c = reference.get_config(arg)
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_codebooks = 4
    c.model.codebook_size = 64
    c.model.max_len = 640
    c.model.timbre_hidden = 96
    c.codec.name = "tiny-encodec"
    c.codec.sample_rate = 32000
    c.codec.frame_rate = 50.0
    c.data.seq_len = 128
    c.data.global_batch = 8
    c.optim.peak_lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.total_steps = 200
    c.train.steps = 200
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 2
    c.train.checkpoint_every = 50
    c.train.keep_every = 0
    c.train.sample_every = 0  # tests and the demo turn samples on where they look at them
    c.train.sample_count = 2
    return c
