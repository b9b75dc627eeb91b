"""LAION's original CLAP checkpoints (`laion_clap` format) -> the transformers `ClapModel` we run.

The official TokenSynth checkpoints were trained on embeddings of LAION's
`music_audioset_epoch_15_esc_90.14.pt` (HTSAT-base audio encoder, fusion off, RoBERTa-base text
encoder), loaded through `laion_clap`. The Hugging Face `laion/larger_clap_music` weights are
reported to differ from that file, so `tokensynth convert-clap` converts the file itself.
- keys: the renames of transformers' `convert_clap_original_pytorch_to_hf.py` (that script imports
  `laion_clap` at module level, so its table is repeated here): `audio_branch` -> `audio_model.
  audio_encoder`, Swin names to transformers' (`attn.qkv` split into query/key/value), the two-layer
  projections to `linear1`/`linear2`.
- dropped on purpose, each checked: the STFT and mel filter banks of LAION's torch front end
  (transformers' `ClapFeatureExtractor` computes the same spectrogram in numpy; the converter
  checks the file's banks are the ones it computes, so a checkpoint with another rate or band
  is an error), the Swin shift masks (transformers builds them on the fly), the AudioSet
  classifier (`tscam_conv`, `head`) and the training-only `*_transform` MLPs, which no embedding
  passes through. Everything else must map one to one, with its shape; the rest is an error
  listing every problem.
- config: read from the tensor shapes (widths, depths, heads from the relative-position tables);
  only RoBERTa's head count is not in the shapes (12 in roberta-base).
The output directory also holds a feature extractor set to LAION's unfused front end (one 10 s
window; shorter clips repeated then zero-padded; `rand_trunc`), so `--clap OUT_DIR` works as is.
torch and transformers are imported lazily, as in convert.py.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from tokensynth_jax.interop.convert import (
    ConversionError,
    mapped_state_problems,
    read_torch_file,
)

# transformers' conversion table, in its order (each applied to every key that contains it).
KEYS_TO_MODIFY_MAPPING = {
    "text_branch": "text_model",
    "audio_branch": "audio_model.audio_encoder",
    "attn": "attention.self",
    "self.proj": "output.dense",
    "attention.self_mask": "attn_mask",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "bn0": "batch_norm",
}
# Original keys with no counterpart in ClapModel (see the module docstring for why each may go).
_DROPPED = re.compile(r"audio_branch\.(tscam_conv|head)\.(weight|bias)|(audio|text)_transform\.sequential\.\d+\.(weight|bias)"
                      r"|audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask|text_branch\.embeddings\.position_ids")
_FRONT_END = ("audio_branch.spectrogram_extractor.stft.conv_real.weight",
              "audio_branch.spectrogram_extractor.stft.conv_imag.weight", "audio_branch.logmel_extractor.melW")
ROBERTA_BASE_HEADS = 12
LAION_CONTEXT_LENGTH = 77  # laion_clap tokenizes text to 77 tokens at most


def rename(key: str) -> str:
    """The transformers name of one original key (before the qkv split)."""
    for old, new in KEYS_TO_MODIFY_MAPPING.items():
        if old in key:
            key = key.replace(old, new)
    if m := re.match(r".*_projection\.(\d+)\.", key):  # Sequential(Linear, ReLU, Linear)
        key = key.replace(f"_projection.{m[1]}.", f"_projection.linear{1 if m[1] == '0' else 2}.")
    return key


def to_transformers_state(state: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Original state dict (without `module.`) -> (ClapModel state dict, keys that map nowhere)."""
    out, unmapped = {}, []
    for key, value in state.items():
        if _DROPPED.fullmatch(key) or key in _FRONT_END:
            continue
        if re.fullmatch(r".*_(transform)\..*|audio_branch\.(spectrogram|logmel)_extractor\..*", key):
            unmapped.append(key)
            continue
        new = rename(key)
        if key.startswith("audio_branch") and ".qkv." in new:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[new.replace("qkv", name)] = part
        else:
            out[new] = value
    return out, unmapped


def config_from_state(state: Mapping[str, Any], text_heads: int = ROBERTA_BASE_HEADS):
    """A ClapConfig read from the original tensors' shapes (see the module docstring)."""
    from transformers import ClapConfig

    def shape(key):
        if key not in state:
            raise ConversionError(f"not a laion_clap HTSAT + RoBERTa state dict: no {key}")
        return tuple(state[key].shape)

    stages = sorted({int(m[1]) for k in state if (m := re.match(r"audio_branch\.layers\.(\d+)\.", k))})
    depths = [len({m[1] for k in state if (m := re.match(rf"audio_branch\.layers\.{s}\.blocks\.(\d+)\.", k))})
              for s in stages]
    heads = [shape(f"audio_branch.layers.{s}.blocks.0.attn.relative_position_bias_table")[1] for s in stages]
    table = shape("audio_branch.layers.0.blocks.0.attn.relative_position_bias_table")[0]
    patch = shape("audio_branch.patch_embed.proj.weight")
    n_text = len({m[1] for k in state if (m := re.match(r"text_branch\.encoder\.layer\.(\d+)\.", k))})
    words, width = shape("text_branch.embeddings.word_embeddings.weight")
    if text_heads < 1 or width % text_heads:
        raise ConversionError(f"{text_heads} text attention heads do not divide the text width {width} "
                              f"(roberta-base: {ROBERTA_BASE_HEADS})")
    projection = shape("audio_projection.0.weight")[0]
    audio = dict(depths=depths, num_attention_heads=heads, window_size=(int(round(table ** 0.5)) + 1) // 2,
                 patch_embeds_hidden_size=patch[0], patch_size=patch[-1], patch_stride=[patch[-1], patch[-1]],
                 hidden_size=shape("audio_branch.norm.weight")[0], num_mel_bins=shape("audio_branch.bn0.weight")[0],
                 num_classes=shape("audio_branch.head.weight")[0] if "audio_branch.head.weight" in state else 527,
                 enable_fusion=False, projection_dim=projection)
    # roberta-base's own settings where ClapTextConfig's defaults differ (layer_norm_eps 1e-12)
    text = dict(vocab_size=words, hidden_size=width, num_hidden_layers=n_text, num_attention_heads=text_heads,
                intermediate_size=shape("text_branch.encoder.layer.0.intermediate.dense.weight")[0],
                max_position_embeddings=shape("text_branch.embeddings.position_embeddings.weight")[0],
                type_vocab_size=shape("text_branch.embeddings.token_type_embeddings.weight")[0],
                layer_norm_eps=1e-5, projection_dim=projection)
    return ClapConfig(audio_config=audio, text_config=text, projection_dim=projection)


def feature_extractor():
    """LAION's unfused front end: 48 kHz, one 10 s window, short clips repeated then padded."""
    from transformers import ClapFeatureExtractor

    # fmin 50 Hz as LAION's HTSAT configs (ClapFeatureExtractor's default is 0 Hz)
    return ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=50, frequency_max=14000)


def _front_end_problems(state: Mapping[str, Any], features) -> list[str]:
    """The file's STFT and mel banks against the ones `features` computes (they are dropped)."""
    missing = [k for k in _FRONT_END if k not in state]
    if missing:
        return [f"missing key {k} (the front end's filter bank)" for k in missing]
    n_fft = features.fft_window_size
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann, as both front ends use
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft // 2 + 1), n) / n_fft) * window
    want = {_FRONT_END[0]: dft.real, _FRONT_END[1]: dft.imag, _FRONT_END[2]: features.mel_filters_slaney}
    problems = []
    for key, expected in want.items():
        got = state[key].detach().float().numpy()
        if got.size != expected.size or not np.allclose(got.reshape(expected.shape), expected, atol=1e-5):
            problems.append(f"front end {key} differs from the {features.sampling_rate} Hz, {n_fft}-point, "
                            f"{features.feature_size}-mel ({features.frequency_min}-{features.frequency_max} Hz) "
                            f"front end ClapFeatureExtractor computes")
    return problems


def from_original(state: Mapping[str, Any], *, text_heads: int = ROBERTA_BASE_HEADS):
    """A transformers ClapModel (eval mode) holding LAION's weights; strict.

    Args:
      state: the original model's state dict (a `module.` prefix, as in LAION's files, is removed).
      text_heads: RoBERTa's attention heads (not in the shapes; 12 in roberta-base).
    Raises:
      ConversionError listing every unmapped, missing or mis-shaped key, and a front end that
      differs from ClapFeatureExtractor's.
    """
    from transformers import ClapModel

    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("audio_branch.fusion_model") or k.startswith("audio_branch.mel_conv") for k in state):
        raise ConversionError("a fusion CLAP checkpoint (feature fusion on); only unfused checkpoints convert")
    features = feature_extractor()
    model = ClapModel(config_from_state(state, text_heads))
    mapped, unmapped = to_transformers_state(state)
    expected = model.state_dict()
    derived = {k for k in expected if k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}
    problems = mapped_state_problems(mapped, unmapped, expected, "the original", optional=derived)
    problems += _front_end_problems(state, features)
    if problems:
        raise ConversionError("laion_clap state dict does not match the architecture:\n  " + "\n  ".join(problems))
    mapped.update({k: expected[k] for k in derived})  # constant index buffers, rebuilt by transformers
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_original_file(path: str | os.PathLike) -> dict:
    """The state dict of a LAION CLAP `.pt` (e.g. music_audioset_epoch_15_esc_90.14.pt)."""
    blob = read_torch_file(path)
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not any(str(k).removeprefix("module.").startswith("audio_branch.") for k in state):
        raise ConversionError(f"{path}: not a laion_clap checkpoint (no 'audio_branch' weights)")
    return dict(state)


def text_width(state: Mapping[str, Any]) -> int:
    """The width of the original's RoBERTa text encoder (what its attention heads must divide)."""
    key = "text_branch.embeddings.word_embeddings.weight"
    value = state.get(key, state.get("module." + key))
    if value is None:
        raise ConversionError(f"not a laion_clap HTSAT + RoBERTa state dict: no {key}")
    return int(value.shape[1])


def load_tokenizer(directory: str | os.PathLike):
    """A RoBERTa tokenizer from a local directory, set to LAION's 77-token limit."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{directory}: not a tokenizer directory ({e})") from e
    tok.model_max_length = LAION_CONTEXT_LENGTH
    return tok


def convert_state(state: Mapping[str, Any], out_dir: str | os.PathLike, *, tokenizer=None,
                  text_heads: int = ROBERTA_BASE_HEADS) -> dict:
    """Writes LAION's state dict as a transformers directory usable as `--clap OUT_DIR`; returns a summary.

    tokenizer: a loaded RoBERTa tokenizer (`load_tokenizer`) to save beside the model (text
    embeddings need one; the hub is out of reach).
    """
    model = from_original(state, text_heads=text_heads)
    model.save_pretrained(out_dir)
    feature_extractor().save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    a = model.config.audio_config
    return {"wrote": str(out_dir), "parameters": sum(p.numel() for p in model.parameters()),
            "audio": {"depths": list(a.depths), "hidden_size": a.hidden_size}}


def convert_file(src: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
                 text_heads: int = ROBERTA_BASE_HEADS) -> dict:
    """Converts LAION's `.pt` into a transformers directory usable as `--clap OUT_DIR`; returns a summary.

    tokenizer: a RoBERTa tokenizer directory to copy in, read before anything is written.
    """
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    summary = convert_state(load_original_file(src), out_dir, tokenizer=tok, text_heads=text_heads)
    return {**summary, "source": os.path.abspath(src), "tokenizer": tokenizer}
