"""Conversion between the official PyTorch state dicts (`tokensynth` 0.0.4) and our parameters.

Strict both ways: a missing, unexpected or mis-shaped key is an error that lists every one (the
reference loads with `strict=False`, which hides such mistakes). Known non-parameter buffers of
the official modules are recognised: `attn.k_cache`/`attn.v_cache` are scratch space and are
dropped; `attn.mask` decides the attention pattern.

The mask matters. The official module registers `mask = triu(ones, 1)` and hands it to torch's
`scaled_dot_product_attention`, whose boolean masks mean True = *attend*: with that default
buffer each position attends only to later positions (see config.AttentionKind). A state dict
that carries the buffer overrides the default on load. So when reading we look at the buffer: a
lower-triangular one is causal; the default inverted one, or none at all, leaves the choice to
the caller (default causal: the paper's model, and the only pattern a decoder can be trained
with). When writing we store the mask of our attention kind, so the official package, loading
our file, computes what we compute.

torch is imported lazily: only this converter and the audio front end touch it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from tokensynth_jax.config import REFERENCE, ModelConfig
from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import token_layout

OFFICIAL_NUM_HEADS = 16  # not recoverable from shapes; the official hyper-parameters
BUFFERS = ("mask", "k_cache", "v_cache")
# What the official package hard-codes (its get_hparams and modules): the reference model's sizes.
# It loads with strict=False, so a file of other sizes fails on a shape or, worse, leaves missing
# blocks random; and it always splits attention into 16 heads, which shapes cannot show.
OFFICIAL_FIXED = ("num_layers", "d_model", "num_heads", "mlp_ratio", "num_codebooks", "codebook_size",
                  "midi_vocab_size", "max_len", "timbre_dim", "timbre_hidden")


class ConversionError(UserError):
    """A state dict that does not match the official architecture; the message lists every problem."""


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official module for `cfg` with its shape (buffers excluded)."""
    d, hidden = cfg.d_model, cfg.timbre_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.max_len, d),
        "midi_tok_embed.weight": (cfg.midi_vocab_size, d),
        "clap_projection.0.weight": (hidden, cfg.timbre_dim),
        "clap_projection.0.bias": (hidden,),
        "clap_projection.2.weight": (d, hidden),
        "clap_projection.2.bias": (d,),
        "ln.weight": (d,),
        "ln.bias": (d,),
        "fc.weight": (cfg.output_size, d),
        "fc.bias": (cfg.output_size,),
    }
    for k in range(cfg.num_codebooks):
        shapes[f"audio_tok_embed.{k}.weight"] = (cfg.codebook_vocab_size, d)
    if cfg.conditioning == "unconditional":
        shapes["sos_tok_embed.weight"] = (1, d)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (d,)
            shapes[p + ln + ".bias"] = (d,)
        for proj in ("key", "value", "query", "proj"):
            shapes[p + f"attn.{proj}.weight"] = (d, d)
            shapes[p + f"attn.{proj}.bias"] = (d,)
        shapes[p + "ff.0.weight"] = (cfg.mlp_dim, d)
        shapes[p + "ff.0.bias"] = (cfg.mlp_dim,)
        shapes[p + "ff.2.weight"] = (d, cfg.mlp_dim)
        shapes[p + "ff.2.bias"] = (d,)
    return shapes


def official_shape_problems(cfg: ModelConfig) -> list[str]:
    """What the official package would reject or misread in a file of `cfg` ([] for the reference shape)."""
    return [f"{name} {getattr(cfg, name)} (it builds {getattr(REFERENCE, name)})"
            for name in OFFICIAL_FIXED if getattr(cfg, name) != getattr(REFERENCE, name)]


def infer_config(state: Mapping[str, Any], num_heads: int = OFFICIAL_NUM_HEADS) -> ModelConfig:
    """The ModelConfig an official state dict describes (sizes read from shapes)."""
    needed = ("midi_tok_embed.weight", "pos_embed", "clap_projection.0.weight", "audio_tok_embed.0.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ConversionError(f"not an official TokenSynth state dict: missing {missing}")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    codebooks = {int(m.group(1)) for k in state if (m := re.match(r"audio_tok_embed\.(\d+)\.", k))}
    midi_vocab, d = tuple(state["midi_tok_embed.weight"].shape)
    hidden, timbre_dim = tuple(state["clap_projection.0.weight"].shape)
    mlp_dim = tuple(state["blocks.0.ff.0.weight"].shape)[0] if "blocks.0.ff.0.weight" in state else 4 * d
    return ModelConfig(
        num_layers=max(layers) + 1 if layers else 0,
        d_model=d,
        num_heads=num_heads,
        mlp_ratio=mlp_dim // d,
        num_codebooks=max(codebooks) + 1,
        codebook_size=tuple(state["audio_tok_embed.0.weight"].shape)[0] - 1,
        midi_vocab_size=midi_vocab,
        max_len=tuple(state["pos_embed"].shape)[1],
        timbre_dim=timbre_dim,
        timbre_hidden=hidden,
        conditioning="unconditional" if "sos_tok_embed.weight" in state else "timbre",
    )


def mask_kind(mask) -> str:
    """'causal', 'tokensynth-0.0.4' (the official default buffer) or 'other' for one mask buffer."""
    m = np.asarray(mask, dtype=bool).reshape(mask.shape[-2:])
    n = m.shape[0]
    if np.array_equal(m, np.tril(np.ones((n, n), bool))):
        return "causal"
    if np.array_equal(m, np.triu(np.ones((n, n), bool), 1)):
        return "tokensynth-0.0.4"
    return "other"


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.dtype.is_floating_point:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def from_official(
    state: Mapping[str, Any], *, num_heads: int = OFFICIAL_NUM_HEADS, attention: str | None = None
) -> tuple[ModelConfig, dict, dict]:
    """Official state dict -> (ModelConfig, our parameter pytree of numpy arrays, report).

    Args:
      state: a `TokenSynth` or `TokenSynthUnconditional` state dict (torch tensors or arrays).
      num_heads: attention heads (not recoverable from shapes).
      attention: force an attention kind; by default a causal mask buffer gives "causal", the
        official default buffer or none gives "causal" too (see the module docstring), and the
        report says which buffer was found.
    Returns:
      (config, params, report) where report lists the dropped buffers and the mask found.
    """
    cfg = infer_config(state, num_heads)
    expected = official_shapes(cfg)
    problems, buffers = [], {}
    for key, value in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if re.fullmatch(r"blocks\.\d+\.attn\.(mask|k_cache|v_cache)", key):
            buffers.setdefault(leaf, []).append(key)
            continue
        if key not in expected:
            problems.append(f"unexpected key {key} {tuple(value.shape)}")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"shape mismatch {key}: {tuple(value.shape)}, expected {expected[key]}")
    problems += [f"missing key {k} {expected[k]}" for k in expected if k not in state]
    if problems:
        raise ConversionError("official state dict does not match the architecture:\n  " + "\n  ".join(problems))

    masks = {mask_kind(_to_numpy(state[k])) for k in buffers.get("mask", [])}
    if "other" in masks or len(masks) > 1:
        raise ConversionError(f"attention mask buffers are not a single known pattern: {sorted(masks)}")
    found = masks.pop() if masks else None
    cfg = cfg.replace(attention=attention or "causal")

    w = {k: _to_numpy(v).astype(np.float32) for k, v in state.items() if k in expected}
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    params: dict[str, Any] = {
        "midi_embed": w["midi_tok_embed.weight"],
        "codebook_embed": np.stack([w[f"audio_tok_embed.{k}.weight"] for k in range(cfg.num_codebooks)]),
        "pos_embed": w["pos_embed"][0],
        "final_ln": {"scale": w["ln.weight"], "bias": w["ln.bias"]},
        "head": {"kernel": w["fc.weight"].T, "bias": w["fc.bias"]},
    }
    if cfg.conditioning == "timbre":
        params["timbre_fc1"] = {"kernel": w["clap_projection.0.weight"].T, "bias": w["clap_projection.0.bias"]}
        params["timbre_fc2"] = {"kernel": w["clap_projection.2.weight"].T, "bias": w["clap_projection.2.bias"]}
    else:
        params["start_embed"] = w["sos_tok_embed.weight"][0]
    params["blocks"] = {}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        attn = {
            name: {"kernel": w[p + f"attn.{name}.weight"].T.reshape(d, h, hd), "bias": w[p + f"attn.{name}.bias"].reshape(h, hd)}
            for name in ("query", "key", "value")
        }
        attn["out"] = {"kernel": w[p + "attn.proj.weight"].T.reshape(h, hd, d), "bias": w[p + "attn.proj.bias"]}
        params["blocks"][i] = {
            "ln1": {"scale": w[p + "ln1.weight"], "bias": w[p + "ln1.bias"]},
            "ln2": {"scale": w[p + "ln2.weight"], "bias": w[p + "ln2.bias"]},
            "attn": attn,
            "mlp": {
                "fc1": {"kernel": w[p + "ff.0.weight"].T, "bias": w[p + "ff.0.bias"]},
                "fc2": {"kernel": w[p + "ff.2.weight"].T, "bias": w[p + "ff.2.bias"]},
            },
        }
    unused = [k for k in expected if k.startswith("clap_projection") and cfg.conditioning == "unconditional"]
    report = {
        "mask_buffer": found or "absent",
        "attention": cfg.attention,
        "dropped_buffers": sorted(k for keys in buffers.values() for k in keys if not k.endswith(".mask")),
        "unused_official_params": unused,  # the official unconditional class inherits an unused timbre MLP
    }
    return cfg, params, report


def to_official(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """Our parameters -> an official state dict (torch tensors) that `TokenSynth.from_pretrained` loads.

    The mask buffers are written in our attention pattern, so the official code computes the same
    attention as ours. The k/v cache buffers are scratch space and are not written.
    """
    import torch  # lazily: only conversion needs torch

    if cfg.null_timbre:
        raise ConversionError("the official format has no null timbre; this model was trained for CFG")
    if cfg.mlp_ratio * cfg.d_model != cfg.mlp_dim or cfg.midi_vocab_size != token_layout.MIDI_VOCAB_SIZE:
        raise ConversionError("the official model has a fixed MIDI vocabulary of 1133 ids")
    p = {k: v for k, v in params.items()}
    f = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
    d = cfg.d_model
    out: dict[str, Any] = {
        "pos_embed": f(np.asarray(p["pos_embed"])[None]),
        "midi_tok_embed.weight": f(p["midi_embed"]),
        "ln.weight": f(p["final_ln"]["scale"]),
        "ln.bias": f(p["final_ln"]["bias"]),
        "fc.weight": f(np.asarray(p["head"]["kernel"]).T),
        "fc.bias": f(p["head"]["bias"]),
    }
    for k in range(cfg.num_codebooks):
        out[f"audio_tok_embed.{k}.weight"] = f(np.asarray(p["codebook_embed"])[k])
    if cfg.conditioning == "timbre":
        out["clap_projection.0.weight"] = f(np.asarray(p["timbre_fc1"]["kernel"]).T)
        out["clap_projection.0.bias"] = f(p["timbre_fc1"]["bias"])
        out["clap_projection.2.weight"] = f(np.asarray(p["timbre_fc2"]["kernel"]).T)
        out["clap_projection.2.bias"] = f(p["timbre_fc2"]["bias"])
    else:  # the official unconditional class still has (unused) timbre MLP weights: write zeros
        out["sos_tok_embed.weight"] = f(np.asarray(p["start_embed"])[None])
        out["clap_projection.0.weight"] = torch.zeros(cfg.timbre_hidden, cfg.timbre_dim)
        out["clap_projection.0.bias"] = torch.zeros(cfg.timbre_hidden)
        out["clap_projection.2.weight"] = torch.zeros(d, cfg.timbre_hidden)
        out["clap_projection.2.bias"] = torch.zeros(d)
    n = cfg.max_len
    ones = torch.ones(n, n, dtype=torch.bool)
    mask = (torch.tril(ones) if cfg.attention == "causal" else torch.triu(ones, 1))[None, None]
    for i in range(cfg.num_layers):
        b, q = p["blocks"][i], f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            out[q + ln + ".weight"] = f(b[ln]["scale"])
            out[q + ln + ".bias"] = f(b[ln]["bias"])
        for name in ("query", "key", "value"):
            out[q + f"attn.{name}.weight"] = f(np.asarray(b["attn"][name]["kernel"]).reshape(d, d).T)
            out[q + f"attn.{name}.bias"] = f(np.asarray(b["attn"][name]["bias"]).reshape(d))
        out[q + "attn.proj.weight"] = f(np.asarray(b["attn"]["out"]["kernel"]).reshape(d, d).T)
        out[q + "attn.proj.bias"] = f(b["attn"]["out"]["bias"])
        out[q + "attn.mask"] = mask.clone()
        out[q + "ff.0.weight"] = f(np.asarray(b["mlp"]["fc1"]["kernel"]).T)
        out[q + "ff.0.bias"] = f(b["mlp"]["fc1"]["bias"])
        out[q + "ff.2.weight"] = f(np.asarray(b["mlp"]["fc2"]["kernel"]).T)
        out[q + "ff.2.bias"] = f(b["mlp"]["fc2"]["bias"])
    return out


def mapped_state_problems(mapped: Mapping, unmapped, expected: Mapping, source: str, optional=()) -> list[str]:
    """Strict loading of a state dict mapped onto another architecture (DAC, CLAP), as error lines:
    keys the mapping does not know, mapped keys the target lacks, target keys not mapped (unless
    `optional`), and shape mismatches."""
    problems = [f"unexpected key {k}" for k in unmapped]
    problems += [f"unexpected key {k} (from {source})" for k in mapped if k not in expected]
    problems += [f"missing key {k} {tuple(v.shape)}" for k, v in expected.items() if k not in mapped and k not in optional]
    problems += [f"shape mismatch {k}: {tuple(mapped[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
    return problems


def read_torch_file(path: str | os.PathLike):
    """`torch.load` of a file of tensors (weights_only: no pickled code runs), with errors naming it.

    The one reader of PyTorch files here: official TokenSynth, descript DAC and LAION CLAP files.
    """
    import torch

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted pickle / zip errors
        raise ConversionError(f"{path}: not a readable PyTorch file ({e})") from e


def save_official_file(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Writes a state dict from `to_official` as the `.pt` file the official package loads."""
    import torch

    torch.save(dict(state), path)


def load_official_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads an official `.pt` state dict (tensors only, no pickled code)."""
    state = read_torch_file(path)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)
