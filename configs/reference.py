"""The paper's TokenSynth (and the official checkpoints): 12 x 1024, 16 heads, ~175M parameters.

Codec DAC 44.1 kHz (9 codebooks of 1024, 86 frames/s); timbre from LAION's CLAP music model.
Every other config derives from this one.

  tokensynth init --config configs/reference.py runs/reference-random
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 12  # pre-LN transformer blocks
    c.model.d_model = 1024  # residual width
    c.model.num_heads = 16  # attention heads
    c.model.mlp_ratio = 4  # MLP hidden = mlp_ratio * d_model
    c.model.num_codebooks = 9  # from the codec: DAC 44.1 kHz uses 9 of its codebooks
    c.model.codebook_size = 1024  # from the codec
    c.model.midi_vocab_size = 1133  # channel-0 vocabulary (tokensynth_jax/midi_tokens.py)
    c.model.max_len = 1024  # learned positions: timbre + MIDI + separator + audio rows + end
    c.model.timbre_dim = 512  # CLAP embedding size
    c.model.timbre_hidden = 1024  # timbre MLP hidden width
    c.model.dropout = 0.1  # residual and embedding dropout while training
    c.model.conditioning = "timbre"  # "unconditional" for the guidance model
    c.model.null_timbre = False  # learn a null timbre for classifier-free guidance
    c.model.attention = "causal"  # "tokensynth-0.0.4" only for parity with that package
    c.model.layer_norm_eps = 1e-5  # LayerNorm epsilon (torch's default, as the reference)
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on GPU/TPU; slower on this CPU)
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "none"  # backward-pass rematerialisation: "none" | "full" | "dots"
    c.model.attention_impl = "auto"  # "auto" (cuDNN on GPU, splash on TPU, XLA on CPU) | "xla" | "cudnn" | "pallas_tpu"
    c.model.scan_layers = True  # blocks as one lax.scan (False: unrolled, no stacked copy of the weights)
    c.model.loss_chunk = 256  # positions per output-head chunk of the loss (0: the whole sequence)

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
