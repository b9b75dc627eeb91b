"""The model's frozen configuration, built once from `config.model` of a Python config file.

The model never sees an `ml_collections.ConfigDict`: it gets this dataclass, which is hashable
(so it can be a static jit argument) and round-trips through the JSON stored beside every
checkpoint.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import numbers
import os
import traceback
from typing import Any, Literal, Mapping

from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import token_layout

# Attention patterns. "causal" is the paper's decoder. "tokensynth-0.0.4" reproduces what the
# reference package computes with its own default mask buffer: it passes `triu(ones, 1)` as a
# boolean mask to torch's scaled_dot_product_attention, where True means *attend*, so each
# position sees only later positions, and rows that see nothing (the last position, every cached
# decoding step) output zeros. Kept only so parity with that package can be tested exactly.
AttentionKind = Literal["causal", "tokensynth-0.0.4"]
Conditioning = Literal["timbre", "unconditional"]
# Sizes that must be at least 1: a config with `num_layers=-1` would build (and save) a model of nothing.
_SIZES = ("num_layers", "d_model", "num_heads", "mlp_ratio", "num_codebooks", "codebook_size", "midi_vocab_size",
          "max_len", "timbre_dim", "timbre_hidden")


class ConfigError(UserError):
    """A config file, override or model config that cannot be used; the message names the field."""


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
RUNTIME_FIELDS = ("dropout", "dtype", "remat", "attention_impl", "scan_layers", "loss_chunk", "dropout_rng",
                  "decode_attention", "matvec_as_gemm", "logits_grad_dtype", "decode_gemm", "gelu_grad",
                  "layer_norm_grad", "residual_layout", "dense_dot")
# How a decoding step attends over the KV cache (see attention.pallas_decode_attention): "xla", the dense
# masked path over every slot; "pallas_gpu", the Pallas (Triton) decode-attention kernel of JAX's
# ops library, which reads only the slots written so far (causal attention only; off a GPU it runs
# in Pallas interpret mode, which is how the CPU tests check its numbers).
# "pallas_fused", a kernel of this package's (attention.pallas_decode_step) that also writes the
# step's keys and values into the cache and needs no split combine: one kernel a layer where the
# library's took six (a decoding step's fused QKV product; elsewhere it means "pallas_gpu").
DECODE_ATTENTION = ("auto", "xla", "pallas_gpu", "pallas_fused")
PALLAS_DECODE_ATTENTION = ("pallas_gpu", "pallas_fused")  # the values that run a Pallas kernel (causal only)
# The products of a decoding step: "xla", XLA's GEMMs; "cublas", the same with XLA's Triton GEMMs
# off (a GPU compile option, sampling.CUBLAS_GEMM_OPTIONS; elsewhere it means "xla"); "pallas", each
# weight stage of a block one Pallas (Triton) kernel with its LayerNorm, bias, GELU and residual
# (layers.GemvBlock, model/gemv.py) when a step has at most 8 rows (off a GPU in interpret mode).
DECODE_GEMM = ("auto", "xla", "cublas", "pallas")
# The memory layout of each block's residual stream [B, L, D]: "xla", what XLA's layout assignment
# picks; "row_major", pinned to row-major at the block's input, middle and output (and so their
# gradients) with `jax.experimental.layout.with_layout_constraint`. Why: in the H100 profile of a
# train step (2026-11-27) XLA kept the residual stream batch-minor ([L][D][B]) and spent about
# 16 ms of a 106 ms step transposing activations, LayerNorm gradients and dropout masks to and
# from it (docs/benchmarks.md).
RESIDUAL_LAYOUT = ("auto", "xla", "row_major")
# How `layers.Dense` hands its product to XLA: "xla", one dot_general over the kernel's own axes
# ([D] x [D, H, h], [H, h] x [H, h, D]); "flat", the input's leading axes and the kernel's input
# and output axes each merged first (reshapes of row-major arrays: no copy), so every product is
# [M, K] x [K, N]. Why: XLA canonicalises a product with several contracting or free axes by
# transposing operands into that form with copies. In the CPU train step's backward pass XLA:CPU
# so transposed every attention kernel and weight gradient of every layer, at under 1 GB/s (0.5 s
# of a step's thread time, `jax.profiler` trace, 2026-11-27); with "flat" its YNNPACK dots read the
# arrays as they lie (docs/benchmarks.md).
DENSE_DOT = ("auto", "xla", "flat")
# The dtypes a model computes in and keeps its weights in (`dtype`, `param_dtype`).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


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
    scan_layers: bool | str = "auto"  # blocks as one lax.scan: True, False, or "auto" (see `scans_layers`)
    loss_chunk: int | str = "auto"  # positions per output-head chunk of the loss (0: all at once; `loss_chunk_size`)
    dropout_rng: str = "auto"  # how dropout masks are drawn: "auto" | "threefry" | "rbg" (see `dropout_rng_impl`)
    decode_attention: str = "auto"  # attention over the KV cache when decoding (DECODE_ATTENTION, `decode_attention_impl`)
    matvec_as_gemm: bool | str = "auto"  # batch-1 decoding runs as batch 2: True, False, "auto" (`decodes_as_gemm`)
    logits_grad_dtype: str = "auto"  # the head's backward products: "auto" | "float32" | "compute" (`logits_grad_impl`)
    decode_gemm: str = "auto"  # the decode loop's products: "auto" | "xla" | "cublas" | "pallas" (`decode_gemm_impl`)
    gelu_grad: str = "auto"  # the MLP GELU's backward: "auto" | "xla" | "recompute" (`gelu_grad_impl`)
    layer_norm_grad: str = "auto"  # the LayerNorms' backward: "auto" | "xla" | "recompute" (`layer_norm_grad_impl`)
    residual_layout: str = "auto"  # the blocks' residual stream: "auto" | "xla" | "row_major" (`residual_layout_impl`)
    dense_dot: str = "auto"  # how Dense layers' products reach XLA: "auto" | "xla" | "flat" (`dense_dot_impl`)

    def __post_init__(self):
        for name in _SIZES:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name}={value!r}: a size must be a positive integer")
        # Checkpoints and command lines from before the policies name remat as a bool.
        legacy = {True: "full", False: "none", "True": "full", "False": "none"}
        if isinstance(self.remat, (bool, str)) and self.remat in legacy:
            object.__setattr__(self, "remat", legacy[self.remat])
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}: unknown; one of {', '.join(REMAT_POLICIES)}")
        for name in ("scan_layers", "matvec_as_gemm"):  # True, False or "auto", from a file or a command line
            value = {"true": True, "false": False, "auto": "auto"}.get(str(getattr(self, name)).lower())
            if value is None:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: one of True, False, 'auto'")
            object.__setattr__(self, name, value)
        if self.attention_impl not in ("auto", "xla", "cudnn", "pallas_tpu"):
            raise ConfigError(f"model.attention_impl={self.attention_impl!r}: unknown; one of auto, xla, cudnn, pallas_tpu")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"model.attention_impl='cudnn' needs dtype bfloat16 or float16 (model.dtype={self.dtype!r})")
        if self.dropout_rng not in ("auto", "threefry", "rbg"):
            raise ConfigError(f"model.dropout_rng={self.dropout_rng!r}: one of 'auto', 'threefry', 'rbg'")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ConfigError(f"model.decode_attention={self.decode_attention!r}: one of {', '.join(DECODE_ATTENTION)}")
        if self.decode_attention in PALLAS_DECODE_ATTENTION and self.attention != "causal":
            raise ConfigError(f"model.decode_attention={self.decode_attention!r} needs model.attention='causal' "
                              f"(model.attention={self.attention!r})")
        if self.logits_grad_dtype not in ("auto", "float32", "compute"):
            raise ConfigError(f"model.logits_grad_dtype={self.logits_grad_dtype!r}: one of 'auto', 'float32', 'compute'")
        if self.decode_gemm not in DECODE_GEMM:
            raise ConfigError(f"model.decode_gemm={self.decode_gemm!r}: one of {', '.join(DECODE_GEMM)}")
        for name in ("gelu_grad", "layer_norm_grad"):
            if getattr(self, name) not in ("auto", "xla", "recompute"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: one of 'auto', 'xla', 'recompute'")
        if self.residual_layout not in RESIDUAL_LAYOUT:
            raise ConfigError(f"model.residual_layout={self.residual_layout!r}: one of {', '.join(RESIDUAL_LAYOUT)}")
        if self.dense_dot not in DENSE_DOT:
            raise ConfigError(f"model.dense_dot={self.dense_dot!r}: one of {', '.join(DENSE_DOT)}")
        chunk = self.loss_chunk
        if isinstance(chunk, str) and chunk.strip().lstrip("-").isdigit():  # from a command line
            chunk = int(chunk)
        if chunk != "auto" and (not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 0):
            raise ConfigError(f"model.loss_chunk={self.loss_chunk!r}: 'auto' or a whole number >= 0")
        object.__setattr__(self, "loss_chunk", chunk if chunk == "auto" else int(chunk))
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model} "
                              "(head_dim = d_model / num_heads)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r}: must be in [0, 1)")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps < float("inf"):
            raise ConfigError(f"model.layer_norm_eps={eps!r}: must be a positive number")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in FLOAT_DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: one of {', '.join(FLOAT_DTYPES)}")
        if self.attention not in ("causal", "tokensynth-0.0.4"):
            raise ConfigError(f"model.attention={self.attention!r}: one of 'causal', 'tokensynth-0.0.4'")
        if self.conditioning not in ("timbre", "unconditional"):
            raise ConfigError(f"model.conditioning={self.conditioning!r}: one of 'timbre', 'unconditional'")

    @property
    def scans_layers(self) -> bool:
        """Whether the blocks of a full forward run as one `lax.scan` on the default backend.

        "auto": unrolled on a GPU, where it measured 14% faster and lighter than the scan (H200,
        batch 32 x 1024: 290.7k vs 254.8k tokens/s, 23.5 vs 32.9 GB; benchmarks/accelerator.py).
        Unrolled on a CPU with `dense_dot="flat"`: as fast as the scan at the reference size (batch
        1 x 1024, two A/B pairs: 4.06 and 4.20 against 4.08 and 4.12 s a step), with 3.3 against
        4.3 GB of temporaries and no per-step stack of the blocks' parameters, though it compiles
        in 11-12 s against 8 (2026-11-27). Scanned on a CPU with "xla" products (unrolled 11.7 s a
        step: XLA:CPU transposing inside every block's backward, see DENSE_DOT) and on a TPU, where
        the loop keeps compile time flat at depth (not measured).
        """
        if self.scan_layers != "auto":
            return self.scan_layers
        if on_gpu():
            return False
        return not (on_cpu() and self.dense_dot_impl == "flat")

    # The "auto" choices below are the fastest measured on an H200 (benchmarks/accelerator.py,
    # 2026-11-27, docs/benchmarks.md); off a GPU each is the plain path, which nothing measured
    # there beats (and a TPU has not been measured).
    @property
    def dropout_rng_impl(self) -> str:
        """"auto": "rbg" on a GPU (batch 32 x 1024: 303.8k vs 294.8k tokens/s), else "threefry"."""
        return self.dropout_rng if self.dropout_rng != "auto" else ("rbg" if on_gpu() else "threefry")

    @property
    def logits_grad_impl(self) -> str:
        """"auto": "compute" on a GPU (307.5k vs 294.8k tokens/s; with rbg dropout 324.2k), else
        "float32" (on a CPU the compute dtype is fp32 anyway)."""
        return self.logits_grad_dtype if self.logits_grad_dtype != "auto" else ("compute" if on_gpu() else "float32")

    @property
    def gelu_grad_impl(self) -> str:
        """"auto": "xla" (JAX's autodiff) everywhere. "recompute" (`layers.gelu_exact`: keeps only the
        input) was 3.4% slower on an H200 at batch 32 x 1024 (324.9k vs 336.2k tokens/s) and kept a
        quarter less memory (19.1 vs 25.5 GB): a memory knob, cheaper than remat ("dots": -10%)."""
        return self.gelu_grad if self.gelu_grad != "auto" else "xla"

    @property
    def layer_norm_grad_impl(self) -> str:
        """"auto": "recompute" (`layers.layer_norm`: keeps the input and two fp32 numbers a row instead
        of three fp32 [B, L, D] arrays) off a GPU, "xla" (JAX's autodiff) on one, where it gave no
        speed (H200, unrolled layers, 2026-11-27). On a CPU, reference size, batch 1 x 1024 (three
        alternating runs each, 2026-11-27): 4.15-4.30 against 4.82-4.99 s a step unrolled, 4.73
        against 5.13 scanned, the same loss, compiling in 7.6 against 12.5 s. On a TPU, where the
        layers are scanned, it takes 2.1 GB off a v5e chip's 9.4 GB plan at batch 8 x 1024 a chip
        (`tokensynth compile-step`; its speed there is not measured)."""
        if self.layer_norm_grad != "auto":
            return self.layer_norm_grad
        return "xla" if on_gpu() else "recompute"

    @property
    def residual_layout_impl(self) -> str:
        """"auto": "xla" everywhere, until a GPU has timed "row_major" (benchmarks/accelerator.py's
        train variants)."""
        return self.residual_layout if self.residual_layout != "auto" else "xla"

    @property
    def dense_dot_impl(self) -> str:
        """"auto": "flat" on a CPU (the reference-size train step, batch 1 x 1024: 4.63 against 5.29 s
        in one A/B, the same loss), "xla" elsewhere until a GPU or TPU has timed "flat"
        (benchmarks/accelerator.py's train variants)."""
        return self.dense_dot if self.dense_dot != "auto" else ("flat" if on_cpu() else "xla")

    @property
    def loss_chunk_size(self) -> int:
        """"auto": 0 (the whole sequence at once) on a GPU, 256 elsewhere. On an H200 the whole-
        sequence loss was faster in every run (+2.5% and +2.6% on 2026-11-26, +3.4% with the other
        GPU defaults on 2026-11-27: 337.6k vs 326.4k tokens/s at batch 32 x 1024, 25.5 vs 23.7 GB);
        chunks keep the fp32 logits of one chunk alive instead of the batch's, which on a CPU's
        memory is what counts."""
        if self.loss_chunk != "auto":
            return self.loss_chunk
        return 0 if on_gpu() else 256

    @property
    def decode_attention_impl(self) -> str:
        """"auto": "pallas_gpu" on a GPU with causal attention and a power-of-two head size, which
        Triton's tiles need (batch 256: 263.7 vs 201.3 clips/s; batch 1 within 2%), else "xla"."""
        if self.decode_attention != "auto":
            return self.decode_attention
        tiles = self.head_dim & (self.head_dim - 1) == 0
        return "pallas_gpu" if on_gpu() and self.attention == "causal" and tiles else "xla"

    @property
    def decode_gemm_impl(self) -> str:
        """"auto": "pallas" on a GPU, "xla" elsewhere (in Pallas interpret mode the kernels are slow).
        On an H200 (2026-11-27) the Pallas stages decoded batch 1 in 228 ms a clip against 240 and 250
        with XLA's GEMMs (two runs); above 8 rows a step runs XLA's GEMMs either way (batch 256:
        262.0 vs 263.4 and 260.9 vs 263.0 clips/s, within run-to-run noise)."""
        if self.decode_gemm != "auto":
            return self.decode_gemm
        return "pallas" if on_gpu() else "xla"

    @property
    def decodes_as_gemm(self) -> bool:
        """Whether `sampling.generate` decodes a batch of one as a batch of two (see
        `sampling._decode_args`). "auto": on a GPU (batch 1: 239 vs 340 ms a clip), not elsewhere."""
        return self.matvec_as_gemm if self.matvec_as_gemm != "auto" else on_gpu()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def max_notes(self) -> int:
        """MIDI notes a prompt may hold and still leave room for the separator, a frame of audio and the end."""
        return (self.max_len - 2 - self.num_codebooks) // token_layout.TOKENS_PER_NOTE

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
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**dict(values))


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


def platform() -> str:
    """The platform the model computes for, which its "auto" choices and Pallas kernels follow: JAX's
    default backend, or the one `compiling_for` names."""
    target = _TARGET_PLATFORM.get()
    if target is not None:
        return target
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def compiling_for(target: str):
    """Models built and traced inside are for `target` ("tpu", "cuda", "rocm", "gpu", "cpu"), not
    the default backend: an ahead-of-time compile for another platform's devices (training/plan.py
    compiles for a TPU topology, benchmarks/gpu_aot.py for an H100, from a host whose backend is
    its CPU). "gpu" asks the GPU backend for its vendor, so name "cuda" or "rocm" where there is none."""
    token = _TARGET_PLATFORM.set(target)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def on_cpu() -> bool:
    """Whether the model computes for the host CPU (`platform`)."""
    return platform() == "cpu"


def on_gpu() -> bool:
    """Whether the model computes for a GPU (`platform`; what the "auto" choices of speed knobs ask)."""
    return platform() in ("gpu", "cuda", "rocm")


REFERENCE = ModelConfig()  # the paper's / official package's model: ~175M parameters


def model_config_dict(**changes: Any):
    """`config.model` of a config file: every `ModelConfig` field, so files and dataclass cannot drift.

    Each field's meaning is its comment in `ModelConfig`; a config file changes values, never the set
    of fields, so every field can be set from a file and as `--config.model.FIELD=value`.
    """
    import ml_collections

    values = ModelConfig(**changes).to_dict()
    # "auto" or a bool / a number: fields of any type, so a config file can set either kind.
    for name in ("scan_layers", "matvec_as_gemm", "loss_chunk"):
        values[name] = ml_collections.FieldReference(values[name], field_type=object)
    return ml_collections.ConfigDict(values)


def _packaged_configs_dir() -> str:
    import tokensynth_jax.configs

    return os.path.dirname(os.path.abspath(tokensynth_jax.configs.__file__))


def resolve_config_path(path: str) -> str:
    """A user's config file, or a packaged one named `tiny`, `configs/tiny.py` or `tiny.py`.

    An existing file always wins, so a user's own `configs/tiny.py` is theirs; otherwise a name
    of a packaged config (installed with the wheel as `tokensynth_jax.configs`) is that config.
    """
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    packaged_dir = _packaged_configs_dir()
    packaged = os.path.join(packaged_dir, name + ".py")
    if path in (name, name + ".py", os.path.join("configs", name + ".py")) and os.path.isfile(packaged):
        return packaged
    if os.path.isdir(path):  # and not a packaged config's name (`demo` beside a workdir named demo/)
        raise ConfigError(f"{path}: is a folder; a config is a .py file that defines get_config(arg)")
    known = sorted(f[:-3] for f in os.listdir(packaged_dir) if f.endswith(".py") and not f.startswith("_"))
    raise ConfigError(f"{path}: no such config file (packaged configs: {', '.join(known)})")


# The groups of a config file's ConfigDict (configs/reference.py has them all).
CONFIG_GROUPS = ("model", "codec", "data", "optim", "train", "mesh")


def load_config_file(spec: str, overrides: Mapping[str, Any] | None = None, *, flag: str = "--config."):
    """Loads `path/to/config.py[:arg]` or a packaged `NAME[:arg]` and calls its `get_config(arg)`.

    Configs import their bases from the package (`from tokensynth_jax.configs import reference`),
    so a user's own file can derive from them too. `overrides` are dotted keys -> values
    (`{"model.num_layers": 2}`), applied with the ConfigDict's own type checks (`apply_overrides`;
    an error names the override as `{flag}{key}`).

    Raises:
      ConfigError: no such file, no `get_config`, a user's file that fails to run or gives no
      ConfigDict, an unknown field or a value of the wrong type.
    """
    import importlib.util

    import ml_collections

    path, _, arg = spec.partition(":")
    path = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"_tokensynth_config_{abs(hash(path))}", path)
    if module_spec is None:  # importlib loads .py files only
        raise ConfigError(f"{path}: not a Python file; a config is a .py file that defines get_config(arg)")
    module = importlib.util.module_from_spec(module_spec)
    with _users_code(path, passthrough=UserError):
        module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file defines get_config(arg)")
    try:
        with _users_code(path, passthrough=ValueError):
            config = module.get_config(arg or None)
    except ConfigError:
        raise
    except ValueError as e:  # a config's own check of its argument (configs/family.py:depth=...)
        raise ConfigError(f"{spec}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config({arg or None!r}) returned {type(config).__name__}, not an "
                          "ml_collections.ConfigDict (derive from ours: from tokensynth_jax.configs import reference)")
    missing = [group for group in CONFIG_GROUPS if not hasattr(config.get(group), "keys")]
    if missing:
        raise ConfigError(f"{path}: get_config() gives no {', '.join(missing)} (a config holds the groups "
                          f"{', '.join(CONFIG_GROUPS)}; derive from ours: from tokensynth_jax.configs import reference)")
    return apply_overrides(config, overrides, path, flag=flag)


@contextlib.contextmanager
def _users_code(path: str, passthrough: type[Exception]):
    """Running a user's config file (not a packaged one): whatever it raises, other than
    `passthrough` (a UserError; from get_config, the ValueError a config raises for a bad argument),
    is one ConfigError naming the file and its line."""
    if os.path.dirname(os.path.abspath(path)) == _packaged_configs_dir():
        yield  # ours: an exception is our bug, with its traceback
        return
    try:
        yield
    except passthrough:
        raise
    except (Exception, SystemExit) as e:  # any error of the user's code is theirs to fix (sys.exit too)
        line = e.lineno if isinstance(e, SyntaxError) else next(
            (frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__))
             if os.path.abspath(frame.filename) == os.path.abspath(path)), None)
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: the config file fails: {type(e).__name__}: {e}") from e


def apply_overrides(config, overrides: Mapping[str, Any] | None, path: str, *, flag: str = "--config."):
    """`config` (a ConfigDict) with dotted keys -> values set; an error names the override as
    `{flag}{key}` and the config file `path`."""
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            if name not in node or not hasattr(node[name], "keys"):
                raise ConfigError(f"{flag}{key}: no config field {key!r} in {path}")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"{flag}{key}: no config field {key!r} in {path}")
        if hasattr(node[leaf], "keys"):  # a group: its fields are set one by one
            example = next(iter(node[leaf].keys()), "FIELD")
            raise ConfigError(f"{flag}{key}={value}: {key} is a group of fields; set one, e.g. {flag}{key}.{example}=...")
        # A field of any type (model.scan_layers) takes the string; ModelConfig reads it.
        node[leaf] = value if node.get_type(leaf) is object else coerce_override(value, node[leaf], key, flag=flag)
    return config


def coerce_override(value: Any, current: Any, key: str, flag: str = "--config.") -> Any:
    """A command-line string as the type of the field it replaces ("a,b" for tuples); an error
    names it as `{flag}{key}={value}`."""
    import ast

    if not isinstance(value, str):
        return value
    if isinstance(current, (tuple, list)):
        return tuple(v for v in value.split(",") if v)
    if isinstance(current, str) or current is None:
        return value
    if isinstance(current, bool):  # as absl's boolean flags read them, whatever the case
        parsed = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(value.lower())
        if parsed is None:
            raise ConfigError(f"{flag}{key}={value}: not a value of type bool (true or false)")
        return parsed
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"{flag}{key}={value}: not a value of type {type(current).__name__}") from e
    if isinstance(current, bool) != isinstance(parsed, bool) or not isinstance(parsed, (int, float, bool)):
        raise ConfigError(f"{flag}{key}={value}: not a value of type {type(current).__name__}")
    if isinstance(current, int) and isinstance(parsed, float) and not parsed.is_integer():  # 2.7 is no int
        raise ConfigError(f"{flag}{key}={value}: not a value of type int")
    return type(current)(parsed)
