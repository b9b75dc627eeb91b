"""The scaling-law model family: one knob, `depth`, sets layers, width and heads.

depth L -> L blocks of width 64 L with L heads of 64 (a fixed aspect ratio d_model / layers = 64
and a fixed head size, as in the Kaplan et al. 2020 and Chinchilla families, where shape matters
little at a given size). Non-embedding parameters (blocks, final norm and output head; not the
lookup tables or the timbre MLP, see tokensynth_jax/flops.py) grow as ~12 L d^2 = 49152 L^3 plus
the head: depth 2 is 1.6M, depth 8 30M, depth 16 211M, depth 27 984M on EnCodec 32 kHz.

`base` picks the codec, data and optimizer setup the sizes sit on: `encodec` (default, the
project's training setup) or `tiny` (tiny-encodec codes, for CI and micro sweeps).

  tokensynth train --config configs/family.py:depth=8 --workdir runs/d8 --config.data.paths=data/train
  tokensynth sweep plan --config configs/family.py --depths 4,6,8,10,12 --budgets 1e17,3e17,1e18 ...
"""
from tokensynth_jax.configs import encodec, tiny

BASES = {"encodec": encodec, "tiny": tiny}
WIDTH_PER_LAYER = 64  # d_model = 64 * depth
HEAD_DIM = 64  # num_heads = d_model / 64 = depth


def dims(depth: int) -> tuple[int, int, int]:
    """(num_layers, d_model, num_heads) of family member `depth`."""
    if depth < 1:
        raise ValueError(f"family depth must be at least 1, got {depth}")
    d_model = WIDTH_PER_LAYER * depth
    return depth, d_model, d_model // HEAD_DIM


def parse_arg(arg) -> dict:
    """"depth=8,base=tiny" -> {"depth": 8, "base": "tiny"}; depth is required."""
    fields = dict(kv.split("=", 1) for kv in (arg or "").split(",") if kv)
    unknown = sorted(set(fields) - {"depth", "base"})
    if unknown or "depth" not in fields:
        raise ValueError(f"configs/family.py takes depth=N[,base={'|'.join(BASES)}], got {arg!r}")
    if fields.get("base", "encodec") not in BASES:
        raise ValueError(f"configs/family.py: unknown base {fields['base']!r}; one of {sorted(BASES)}")
    return {"depth": int(fields["depth"]), "base": fields.get("base", "encodec")}


def get_config(arg=None):
    fields = parse_arg(arg)
    c = BASES[fields["base"]].get_config(None)
    c.model.num_layers, c.model.d_model, c.model.num_heads = dims(fields["depth"])
    c.model.dropout = 0.0  # scaling runs see each example about once: no dropout (Chinchilla, Kaplan)
    c.train.sample_every = 0  # no generated samples: a sweep compares losses
    return c
