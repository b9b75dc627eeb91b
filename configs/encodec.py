"""The project's default training setup: the reference architecture on EnCodec 32 kHz tokens.

EnCodec 32 kHz has 4 codebooks of 2048 at 50 frames/s: a 5 s clip is 250 frames, 253 delayed
rows, so 512 positions hold the timbre, up to 63 notes (252 MIDI tokens), the separator, the
audio and the end row. bf16 compute with fp32 master weights, as on TPU and GPU.

  tokensynth train --config configs/encodec.py --workdir runs/encodec \
      --config.data.paths=data/train --config.data.eval_paths=data/valid
"""
from tokensynth_jax.configs import reference


def get_config(arg=None):
    c = reference.get_config(arg)
    c.model.num_codebooks = 4
    c.model.codebook_size = 2048
    c.model.max_len = 512
    c.model.null_timbre = True  # learn a null timbre: classifier-free guidance at sampling time
    c.model.dtype = "bfloat16"
    c.codec.name = "facebook/encodec_32khz"
    c.codec.sample_rate = 32000
    c.codec.frame_rate = 50.0
    c.data.seq_len = 512
    c.data.global_batch = 256
    c.train.null_rate = 0.1  # timbre dropout for CFG
    return c
