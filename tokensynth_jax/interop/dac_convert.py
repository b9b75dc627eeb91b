"""Descript's DAC weights (`descript-audio-codec`) -> the transformers `DacModel` we run, exactly.

The official TokenSynth checkpoints were trained on codes of descript's 44.1 kHz DAC (9 codebooks
of 1024, hop 512) and the reference decodes with `quantizer.from_codes` + `decode`. Three things
decide whether our codec gives the same numbers:
- weights: the key mapping is the one of transformers' `convert_dac_checkpoint.py`; weight norm is
  folded with `torch._weight_norm`, the kernel descript's weight-normed convs run on every
  forward, so the folded weight is bit-identical to the one descript computes. Strict: every
  missing, unexpected or mis-shaped key is listed in one error.
- padding: descript's `DAC.preprocess` right-pads to a multiple of the hop, so a 5 s clip at
  44.1 kHz (220,500 samples) gives ceil(220500 / 512) = 431 frames; transformers' `encode` does
  not pad (430 frames). `encode` here pads as descript does.
- eval mode: in train mode both quantizers ignore `n_quantizers` (quantizer dropout); `encode`
  here always runs in eval mode.
torch and transformers are imported lazily, as in convert.py.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np

from tokensynth_jax.interop.convert import (
    ConversionError,
    mapped_state_problems,
    read_torch_file,
)


def num_frames(num_samples: int, hop_length: int = 512) -> int:
    """Frames descript's DAC gives for a clip (its preprocess pads up to a whole hop)."""
    return math.ceil(num_samples / hop_length)


def _hf_module(name: str, num_rates: int) -> str | None:
    """transformers module path of one descript module path (transformers' conversion table)."""
    n = num_rates
    fixed = {"encoder.block.0": "encoder.conv1", f"encoder.block.{n + 1}": "encoder.snake1",
             f"encoder.block.{n + 2}": "encoder.conv2", "decoder.model.0": "decoder.conv1",
             f"decoder.model.{n + 1}": "decoder.snake1", f"decoder.model.{n + 2}": "decoder.conv2"}
    if name in fixed:
        return fixed[name]
    if re.fullmatch(r"quantizer\.quantizers\.\d+\.(in_proj|out_proj|codebook)", name):
        return name
    res = ("snake1", "conv1", "snake2", "conv2")
    if m := re.fullmatch(r"encoder\.block\.(\d+)\.block\.(\d+)\.block\.([0-3])", name):  # residual units first
        return f"encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{res[int(m[3])]}"
    if m := re.fullmatch(r"encoder\.block\.(\d+)\.block\.([34])", name):
        return f"encoder.block.{int(m[1]) - 1}.{'snake1' if m[2] == '3' else 'conv1'}"
    if m := re.fullmatch(r"decoder\.model\.(\d+)\.block\.(\d+)\.block\.([0-3])", name):  # after snake + conv_t
        return f"decoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) - 1}.{res[int(m[3])]}"
    if m := re.fullmatch(r"decoder\.model\.(\d+)\.block\.([01])", name):
        return f"decoder.block.{int(m[1]) - 1}.{'snake1' if m[2] == '0' else 'conv_t1'}"
    return None


def _weight_norm_dim(g) -> int:
    """The axis descript's weight norm kept (the one axis of `weight_g` that is not 1)."""
    return next((d for d, s in enumerate(g.shape) if s != 1), 0)


def to_transformers_state(state: Mapping[str, Any], num_rates: int = 4) -> tuple[dict, list[str]]:
    """descript DAC state dict -> (transformers DacModel state dict, names that map nowhere)."""
    import torch

    out, unmapped = {}, []
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        target = _hf_module(module, num_rates)
        if target is None or leaf not in ("weight_g", "weight_v", "weight", "bias", "alpha"):
            unmapped.append(key)
        elif leaf == "weight_v":
            if module + ".weight_g" not in state:
                unmapped.append(key)
                continue
            g = state[module + ".weight_g"]
            out[target + ".weight"] = torch._weight_norm(value, g, _weight_norm_dim(g))
        elif leaf != "weight_g" or module + ".weight_v" not in state:
            out[f"{target}.{leaf}"] = value
    return out, unmapped


def config_from_descript(kwargs: Mapping[str, Any]):
    """A transformers DacConfig from descript's constructor arguments (`metadata.kwargs` of a .pth)."""
    from transformers import DacConfig

    return DacConfig(
        encoder_hidden_size=kwargs.get("encoder_dim", 64), downsampling_ratios=list(kwargs.get("encoder_rates", [2, 4, 8, 8])),
        decoder_hidden_size=kwargs.get("decoder_dim", 1536), upsampling_ratios=list(kwargs.get("decoder_rates", [8, 8, 4, 2])),
        n_codebooks=kwargs.get("n_codebooks", 9), codebook_size=kwargs.get("codebook_size", 1024),
        codebook_dim=kwargs.get("codebook_dim", 8), quantizer_dropout=float(kwargs.get("quantizer_dropout", 0.0)),
        sampling_rate=kwargs.get("sample_rate", 44100),
    )


def from_descript(state: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None):
    """A transformers DacModel (eval mode) holding descript's weights; strict.

    Args:
      state: the `state_dict` of descript's `dac.DAC` (weight-normed: `weight_g` / `weight_v`).
      kwargs: its constructor arguments (the `.pth` file's `metadata.kwargs`); default 44.1 kHz.
    Raises:
      ConversionError listing every unmapped, missing or mis-shaped key.
    """
    from transformers import DacModel

    config = config_from_descript(kwargs or {})
    model = DacModel(config)
    mapped, unmapped = to_transformers_state(state, len(config.downsampling_ratios))
    expected = model.state_dict()
    problems = mapped_state_problems(mapped, unmapped, expected, "descript")
    if problems:
        raise ConversionError("descript DAC state dict does not match the architecture:\n  " + "\n  ".join(problems))
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_descript_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, constructor kwargs) of a descript `.pth` (e.g. weights_44khz_8kbps_0.0.1.pth)."""
    blob = read_torch_file(path)
    if not isinstance(blob, Mapping) or "state_dict" not in blob:
        raise ConversionError(f"{path}: not a descript DAC file (no 'state_dict')")
    return dict(blob["state_dict"]), dict(blob.get("metadata", {}).get("kwargs", {}))


def encode(model, audio_bn: np.ndarray, n_quantizers: int | None = None) -> np.ndarray:
    """Codes [B, K, T] of mono clips [B, N] as descript's `preprocess` + `encode` give them.

    Pads on the right to a whole hop (descript's frame count) and runs in eval mode, so
    `n_quantizers` is honoured (train mode would apply quantizer dropout instead). The audio goes
    to the model's device; the codes come back to the host.
    """
    import torch

    hop = int(np.prod(model.config.downsampling_ratios))
    audio_bn = np.asarray(audio_bn, np.float32)
    pad = num_frames(audio_bn.shape[-1], hop) * hop - audio_bn.shape[-1]
    device = next(model.parameters()).device
    x = torch.from_numpy(np.pad(audio_bn, ((0, 0), (0, pad))))[:, None, :].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model.encode(x, n_quantizers=n_quantizers).audio_codes.cpu().numpy()
    finally:
        model.train(was_training)
