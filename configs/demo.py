"""The offline demo's model: configs/tiny.py on the demo codec's codes, trained to play notes in minutes.

`tokensynth demo` prepares the data first and then sets the codec fields (the fitted state's
path) and the sequence length from what it prepared; run by hand it is

  tokensynth train --config configs/demo.py --workdir runs/demo-train \
    --config.codec.name=runs/demo/data/codec/demo-melrvq.npz \
    --config.data.paths=runs/demo/data/train --config.data.eval_paths=runs/demo/data/valid
"""
from tokensynth_jax.configs import tiny


def get_config(arg=None):
    c = tiny.get_config(arg)
    c.model.num_codebooks = 4  # demo-melrvq: loudness + 3 shape stages
    c.model.codebook_size = 256  # demo-melrvq's levels and centroids per codebook
    c.model.dropout = 0.0  # minutes of training on a small set: no regularisation needed yet
    c.codec.name = "demo-melrvq"  # the demo replaces this with the fitted state's path
    c.codec.sample_rate = 16000  # Hz
    c.codec.frame_rate = 25.0  # frames per second (16000 / 640)
    c.data.seq_len = 208  # timbre + 16 notes x 4 + separator + 128 audio rows + end, rounded up to 16
    c.optim.peak_lr = 3e-3  # after warmup
    c.optim.warmup_steps = 50  # linear warmup
    c.optim.total_steps = 1200  # cosine length (the demo sets it to its step count)
    c.train.steps = 1200  # optimizer steps
    c.train.log_every = 50  # steps between metric lines
    c.train.eval_every = 400  # steps between held-out evaluations
    c.train.checkpoint_every = 400  # steps between checkpoints (a rerun resumes from the last)
    return c
