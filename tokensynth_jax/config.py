"""The model's frozen configuration, built once from `config.model` of a Python config file.

The model never sees an `ml_collections.ConfigDict`: it gets this dataclass, which is hashable
(so it can be a static jit argument) and round-trips through the JSON stored beside every
checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Mapping

from tokensynth_jax import token_layout

# Attention patterns. "causal" is the paper's decoder. "tokensynth-0.0.4" reproduces what the
# reference package computes with its own default mask buffer: it passes `triu(ones, 1)` as a
# boolean mask to torch's scaled_dot_product_attention, where True means *attend*, so each
# position sees only later positions, and rows that see nothing (the last position, every cached
# decoding step) output zeros. Kept only so parity with that package can be tested exactly.
AttentionKind = Literal["causal", "tokensynth-0.0.4"]
Conditioning = Literal["timbre", "unconditional"]
# How causal self-attention over a sequence (training, prefill) is computed; see attention.py.
# "auto": cuDNN flash attention on a CUDA GPU with bf16/fp16 compute, Pallas splash attention on
# a TPU, the chunked XLA path elsewhere (fastest on CPU). All give the same numbers.
AttentionImpl = Literal["auto", "xla", "cudnn", "pallas_tpu"]
# Rematerialisation of each block in the backward pass: "none" keeps every activation; "full"
# keeps only each block's input (least memory, one more forward); "dots" keeps the matmul outputs
# without batch dimensions and the attention output, and recomputes the cheap elementwise work
# (LayerNorm, GELU, dropout, softmax) and the attention scores.
Remat = Literal["none", "full", "dots"]
REMAT_POLICIES = ("none", "full", "dots")
# Config fields that change how the model computes, not its parameters: a checkpoint trained
# with one value loads under another.
RUNTIME_FIELDS = ("dropout", "dtype", "remat", "attention_impl", "scan_layers", "loss_chunk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the TokenSynth decoder."""

    num_layers: int = 12  # pre-LN transformer blocks
    d_model: int = 1024  # residual width
    num_heads: int = 16  # attention heads; head_dim = d_model // num_heads
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model (GELU)
    num_codebooks: int = 9  # codec codebooks (channels 1..K of a row)
    codebook_size: int = 1024  # codes per codebook; ids are code + 1, 0 = empty
    midi_vocab_size: int = token_layout.MIDI_VOCAB_SIZE  # channel-0 vocabulary
    max_len: int = 1024  # learned positions (timbre + rows)
    timbre_dim: int = 512  # CLAP embedding size
    timbre_hidden: int = 1024  # hidden width of the timbre MLP (512 -> 1024 -> ReLU -> d_model)
    dropout: float = 0.1  # embedding, attention-output and MLP-output dropout (training only)
    conditioning: Conditioning = "timbre"  # "unconditional": a learned start embedding instead
    null_timbre: bool = False  # a learned null embedding for classifier-free guidance
    attention: AttentionKind = "causal"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype of activations and matmuls ("bfloat16" on TPU/GPU)
    param_dtype: str = "float32"  # master weights
    remat: Remat = "none"  # "none" | "full" | "dots" (see Remat); True/False still mean "full"/"none"
    attention_impl: AttentionImpl = "auto"  # "auto" | "xla" | "cudnn" | "pallas_tpu" (see AttentionImpl)
    scan_layers: bool = True  # blocks as one lax.scan (XLA:CPU's backward is quadratic in depth unrolled)
    loss_chunk: int = 256  # positions per output-head chunk of the training loss (0: all at once)

    def __post_init__(self):
        # Checkpoints and command lines from before the policies name remat as a bool.
        legacy = {True: "full", False: "none", "True": "full", "False": "none"}
        if isinstance(self.remat, (bool, str)) and self.remat in legacy:
            object.__setattr__(self, "remat", legacy[self.remat])
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; one of {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ("auto", "xla", "cudnn", "pallas_tpu"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; one of auto, xla, cudnn, pallas_tpu")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"attention_impl 'cudnn' needs dtype bfloat16 or float16, not {self.dtype!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.attention not in ("causal", "tokensynth-0.0.4"):
            raise ValueError(f"unknown attention {self.attention!r}")
        if self.conditioning not in ("timbre", "unconditional"):
            raise ValueError(f"unknown conditioning {self.conditioning!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def codebook_vocab_size(self) -> int:
        return token_layout.codebook_vocab_size(self.codebook_size)

    @property
    def num_channels(self) -> int:
        return 1 + self.num_codebooks

    @property
    def output_size(self) -> int:
        """Width of the output head: MIDI logits then each codebook's logits."""
        return self.midi_vocab_size + self.num_codebooks * self.codebook_vocab_size

    def channel_slices(self) -> list[tuple[int, int]]:
        """(start, stop) of each channel's logits in the output head."""
        out = [(0, self.midi_vocab_size)]
        for k in range(self.num_codebooks):
            start = self.midi_vocab_size + k * self.codebook_vocab_size
            out.append((start, start + self.codebook_vocab_size))
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def runtime(self) -> dict[str, Any]:
        """The fields of RUNTIME_FIELDS: `other.replace(**cfg.runtime()) == cfg` when the two
        configs describe the same parameters."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a mapping (a ConfigDict's `to_dict()` or checkpoint JSON); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**dict(values))


REFERENCE = ModelConfig()  # the paper's / official package's model: ~175M parameters


def load_config_file(spec: str, overrides: Mapping[str, Any] | None = None):
    """Loads `path/to/config.py[:arg]` and calls its `get_config(arg)` (big_vision style).

    The config file's parent directory's parent goes on sys.path, so configs can import their
    siblings (`from configs import reference`). `overrides` are dotted keys -> values
    (`{"model.num_layers": 2}`), applied with the ConfigDict's own type checks.
    """
    import importlib.util
    import os
    import sys

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_tokensynth_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file defines get_config(arg)")
    config = module.get_config(arg or None)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"{path}: no config field {key!r}")
        node[leaf] = _coerce(value, node[leaf], key)
    return config


def _coerce(value: Any, current: Any, key: str) -> Any:
    """A command-line string as the type of the field it replaces ("a,b" for tuples)."""
    import ast

    if not isinstance(value, str):
        return value
    if isinstance(current, (tuple, list)):
        return tuple(v for v in value.split(",") if v)
    if isinstance(current, str) or current is None:
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"config field {key!r}: cannot read {value!r} as {type(current).__name__}") from e
    if isinstance(current, bool) != isinstance(parsed, bool) or not isinstance(parsed, (int, float, bool)):
        raise ValueError(f"config field {key!r}: {value!r} is not a {type(current).__name__}")
    return type(current)(parsed)
