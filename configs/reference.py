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
    c.model.max_len = 1024  # learned positions: timbre + MIDI + separator + audio rows + end
    c.model.timbre_dim = 512  # CLAP embedding size
    c.model.timbre_hidden = 1024  # timbre MLP hidden width
    c.model.dropout = 0.1  # residual and embedding dropout while training
    c.model.conditioning = "timbre"  # "unconditional" for the guidance model
    c.model.null_timbre = False  # learn a null timbre for classifier-free guidance
    c.model.attention = "causal"  # "tokensynth-0.0.4" only for parity with that package
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights

    c.codec = ml_collections.ConfigDict()
    c.codec.name = "descript/dac_44khz"  # Hugging Face id of the codec
    c.codec.sample_rate = 44100  # Hz
    c.codec.frame_rate = 86.1328125  # frames per second (44100 / 512)
    return c
