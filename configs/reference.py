"""The paper's TokenSynth (and the official checkpoints): 12 x 1024, 16 heads, ~175M parameters.

Codec DAC 44.1 kHz (9 codebooks of 1024, 86 frames/s); timbre from LAION's CLAP music model.
Every other config derives from this one.

  tokensynth init --config configs/reference.py runs/reference-random
"""
import ml_collections

from tokensynth_jax.config import model_config_dict


def get_config(arg=None):
    if arg is not None:  # `--config tiny:xyz` is a typo, not a variant (configs/family.py takes arguments)
        raise ValueError(f"takes no argument, got {arg!r}")
    c = ml_collections.ConfigDict()
    # Every ModelConfig field (tokensynth_jax/config.py documents each); the defaults are this model.
    c.model = model_config_dict()

    c.codec = ml_collections.ConfigDict()
    c.codec.name = "descript/dac_44khz"  # Hugging Face id of the codec
    c.codec.sample_rate = 44100  # Hz
    c.codec.frame_rate = 86.1328125  # frames per second (44100 / 512)

    c.data = ml_collections.ConfigDict()
    c.data.paths = ()  # training shards: files, globs or directories (set on the command line)
    c.data.eval_paths = ()  # held-out instruments
    c.data.seq_len = 1024  # positions per example (timbre + MIDI + separator + audio + end)
    c.data.global_batch = 64  # examples per step over all processes
    c.data.worker_count = 0  # grain worker processes per host
    c.data.allow_mixed_clap = False  # shards whose timbres come from different CLAPs are an error
    c.data.verify_sha256 = False  # before step 0, check each shard's sha256 against prep's (reads every byte)

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-4  # after warmup
    c.optim.end_lr_ratio = 0.1  # cosine ends at peak_lr * end_lr_ratio
    c.optim.warmup_steps = 2000  # linear warmup from 0
    c.optim.total_steps = 200_000  # schedule length
    c.optim.b1 = 0.9  # Adam first moment
    c.optim.b2 = 0.95  # Adam second moment
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # on dense kernels only
    c.optim.clip_norm = 1.0  # global-norm clipping (0 disables)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200_000  # optimizer steps
    c.train.seed = 0  # parameters, data order, dropout
    c.train.grad_accum = 1  # micro-batches per step
    c.train.null_rate = 0.0  # timbre dropout to the null embedding (needs model.null_timbre)
    c.train.log_every = 100  # steps between metric lines
    c.train.eval_every = 5000  # steps between evaluations on eval_paths
    c.train.eval_batches = 20  # batches per evaluation
    c.train.checkpoint_every = 2000  # steps between checkpoints
    c.train.keep_last = 3  # newest checkpoints kept
    c.train.keep_every = 50_000  # also keep every step divisible by this (0: none)
    c.train.checkpoint_checksums = True  # sha256 of every checkpoint file, checked on resume (False: sizes only)
    c.train.require_latest_checkpoint = False  # a damaged newest checkpoint stops the run instead of falling back
    c.train.sample_every = 10_000  # steps between generated samples (0: none); see train_samples.py
    c.train.sample_count = 4  # held-out prompts generated from
    c.train.sample_top_p = 0.0  # 0: greedy; else nucleus sampling with this p
    c.train.sample_audio = True  # decode samples to WAV when the codec loads
    c.train.peak_flops_per_device = 0.0  # for the MFU metric; 0: from the device kind (TPU, H100, A100)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data parallelism (-1: the devices left over)
    c.mesh.fsdp = 1  # parameter sharding over the batch
    c.mesh.tensor = 1  # tensor parallelism (heads, MLP, vocabulary)
    return c
