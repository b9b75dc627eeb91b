"""`jax.export` of the whole generation function: prefill, the decode `while_loop` and sampling.

An export directory holds what a process with only jax and numpy needs to generate tokens:

    OUT/generate.jaxexport    the serialized `Exported` (StableHLO for cpu, cuda and tpu)
    OUT/params.npz            the parameters, flat dotted names (safetensors_format's naming)
    OUT/export.json           token layout, codec, sampler, inputs and outputs, seed handling
    OUT/load_exported.py      a standalone loader (imports jax and numpy only)
    OUT/example_prompt.npz    optional: MIDI files tokenized for the loader

The parameters are arguments, not constants: the artifact stays small and weights of the same
config can be swapped. Batch and prompt length are symbolic (`b`, `m`); the sampler, the
length cap and the model config are baked in. The function takes MIDI *tokens*, not MIDI files:
tokenizing MIDI needs this package (`tokensynth export --example-midi` writes them). It builds the
prompt rows (left padding, separator) and removes the delay pattern inside, calling the same
decode loop as `sampling.generate`, so the same seed gives the same tokens (bitwise for float32
compute; bfloat16 intermediates may round differently in the two compiled programs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tokensynth_jax
from tokensynth_jax import checkpoint
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.errors import UserError
from tokensynth_jax.inference import sampling
from tokensynth_jax.interop import safetensors_format
from tokensynth_jax.model.transformer import abstract_model
from tokensynth_jax.tokens import token_layout

FORMAT = "tokensynth-jax-export"
FORMAT_VERSION = 1
EXPORTED_FILE = "generate.jaxexport"
PARAMS_FILE = "params.npz"
META_FILE = "export.json"
LOADER_FILE = "load_exported.py"
EXAMPLE_PROMPT_FILE = "example_prompt.npz"
LOADER_SOURCE = os.path.join(os.path.dirname(__file__), "assets", LOADER_FILE)
PLATFORMS = ("cpu", "cuda", "tpu")
KEY_IMPL = "threefry2x32"  # the key data input is raw threefry key data: jax.random.PRNGKey(seed)


class ExportError(UserError):
    """A model or option that cannot be exported; the message names the checkpoint or flag."""


def codes_from_rows(rows_brc, num_rows_b, num_codebooks: int):
    """In-graph `sampling.rows_to_codes`: codes [B, R - K + 1, K] padded with -1, frames [B]."""
    width = rows_brc.shape[1] - num_codebooks + 1
    frames = jnp.maximum(num_rows_b - (num_codebooks - 1), 0)
    codes = token_layout.remove_delay(rows_brc[..., 1:])
    return jnp.where(jnp.arange(width)[None, :, None] < frames[:, None, None], codes, -1), frames


def make_generate_fn(cfg: ModelConfig, sampler, max_rows: int):
    """The exported function: (params, midi [B, M], lengths [B], timbre [B, T], key_data [2]) -> outputs.

    Item b's MIDI tokens are `midi[b, :lengths[b]]` (the rest is ignored). Outputs: codes
    [B, max_rows - K + 1, K] (-1 after each item's end), num_frames [B], ended [B] (stopped on an
    end row, not the cap), rows [B, max_rows, 1 + K] (generated delayed rows), num_rows [B].
    """
    # The XLA attention lowers for every platform; the fused kernels are per platform, and a
    # custom call without a compatibility guarantee cannot be serialized.
    cfg = cfg.replace(attention_impl="xla", decode_attention="xla")
    names, treedef, _ = safetensors_format.param_structure(cfg)
    abstract = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(abstract)

    def generate(params, midi_bm, lengths_b, timbre_bt, key_data):
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, [params[n] for n in names]))
        batch, width = midi_bm.shape
        # Left-padded prompt rows as sampling.prepare_prompts builds them: item b's MIDI rows end
        # just before the last slot, which is the separator (a zero row, like the padding).
        pad_b = width - lengths_b
        idx = jnp.arange(width + 1)[None] - pad_b[:, None]
        inside = (idx >= 0) & (idx < lengths_b[:, None])
        channel0 = jnp.where(inside, jnp.take_along_axis(midi_bm, jnp.clip(idx, 0, width - 1), axis=1), 0)
        rows = jnp.zeros((batch, width + 1, cfg.num_channels), jnp.int32).at[..., 0].set(channel0)
        caps = jnp.minimum(max_rows, cfg.max_len - 2 - lengths_b)
        key = jax.random.wrap_key_data(key_data, impl=KEY_IMPL)
        final = sampling.decode_loop(  # the loop `sampling.generate` jits
            nnx.merge(graphdef, state), rows, pad_b, caps, timbre_bt, key, sampler=sampler, max_rows=max_rows,
        )
        codes, frames = codes_from_rows(final.rows, final.num_rows, cfg.num_codebooks)
        return codes, frames, final.ended, final.rows, final.num_rows

    return generate


def export_generate(cfg: ModelConfig, sampler, max_rows: int, platforms: Sequence[str] = PLATFORMS):
    """`jax.export.Exported` of `make_generate_fn` with symbolic batch `b` and MIDI length `m`."""
    if max_rows < cfg.num_codebooks:
        raise ExportError(f"--max-rows {max_rows} is fewer than the {cfg.num_codebooks} rows one frame needs")
    if max_rows > cfg.max_len - 3:  # rows no prompt could reach: the caps stop every item before them
        raise ExportError(f"--max-rows {max_rows} is more than the {cfg.max_len - 3} audio rows the model's "
                          f"{cfg.max_len} positions hold after the start, one MIDI token and the separator")
    _, _, specs = safetensors_format.param_structure(cfg)
    b, m = jax.export.symbolic_shape("b, m", constraints=("m >= 1",))
    args = (
        {n: jax.ShapeDtypeStruct(shape, dtype) for n, (shape, dtype) in specs.items()},
        jax.ShapeDtypeStruct((b, m), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b, cfg.timbre_dim), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    fn = jax.jit(make_generate_fn(cfg, sampler, max_rows))
    return jax.export.export(fn, platforms=tuple(platforms))(*args)


def sampler_settings(sampler) -> dict:
    """The baked-in sampler as JSON."""
    return {"kind": type(sampler).__name__, **{k: getattr(sampler, k) for k in getattr(sampler, "__dataclass_fields__", {})}}


def pad_tokens(tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays of different lengths -> (right-padded [N, M], lengths [N]), M + 1 a multiple of 16."""
    lengths = np.array([len(t) for t in tokens], np.int32)
    width = -(-(int(lengths.max()) + 1) // sampling.PROMPT_BUCKET) * sampling.PROMPT_BUCKET - 1
    midi = np.zeros((len(tokens), width), np.int32)
    for i, t in enumerate(tokens):
        midi[i, : len(t)] = t
    return midi, lengths


def export_model(model, out_dir: str, *, metadata: dict, source: str, sampler=sampling.TopP(0.9),
                 max_rows: int = 450, platforms: Sequence[str] = PLATFORMS,
                 example_prompt: dict[str, np.ndarray] | None = None, example_source: dict | None = None) -> dict:
    """Writes the export directory described in the module docstring; returns its metadata.

    Args:
      model: a timbre-conditioned TokenSynth (`checkpoint.load_model`).
      out_dir: the directory to write (created).
      metadata: the checkpoint's free-form metadata (codec, weights), recorded in export.json.
      source: where the model came from, recorded in export.json.
      sampler, max_rows: baked into the exported function.
      platforms: lowering platforms (cpu, cuda, rocm, tpu).
      example_prompt: arrays for OUT/example_prompt.npz (`midi` and `lengths` from `pad_tokens`,
        optionally `timbre`), or None.
      example_source: where the example prompt came from (its MIDI files, the tokenizer), recorded
        in export.json beside the file's name.
    """
    cfg = model.cfg
    if cfg.conditioning != "timbre":
        raise ExportError(f"{source}: only timbre-conditioned models are exported (this one is unconditional)")
    unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if unknown:
        raise ExportError(f"unknown platforms {unknown}; jax lowers for cpu, cuda, rocm and tpu")
    if getattr(sampler, "method", None) is not None:  # the filter method this machine picks is baked in
        sampler = dataclasses.replace(sampler, method=sampling.filter_method(sampler.method))
    exported = export_generate(cfg, sampler, max_rows, platforms)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, EXPORTED_FILE), "wb") as f:
        f.write(exported.serialize())
    np.savez(os.path.join(out_dir, PARAMS_FILE), **safetensors_format.flatten_params(checkpoint.params_to_numpy(model)))
    shutil.copyfile(LOADER_SOURCE, os.path.join(out_dir, LOADER_FILE))
    frames = max_rows - cfg.num_codebooks + 1
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "tokensynth_jax_version": tokensynth_jax.__version__,
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "files": {"exported": EXPORTED_FILE, "params": PARAMS_FILE, "loader": LOADER_FILE},
        "source_checkpoint": source,
        "model": cfg.to_dict(),
        "codec": metadata.get("codec"),
        "weights": metadata.get("weights"),
        "sampler": sampler_settings(sampler),
        "max_rows": max_rows,
        "max_midi_tokens": cfg.max_len - 2 - cfg.num_codebooks,
        "prompt_bucket": sampling.PROMPT_BUCKET,
        "seed": (f"key_data = jax.random.key_data(jax.random.key(seed, impl='{KEY_IMPL}')), i.e. "
                 "jax.random.PRNGKey(seed); item b samples with fold_in(key, b), step s with fold_in(that, s)"),
        "token_layout": {
            "row": f"{cfg.num_channels} channels: 0 = MIDI token, 1..{cfg.num_codebooks} = codebooks (code + 1, 0 = empty)",
            "midi_vocab_size": cfg.midi_vocab_size,
            "midi_tokens": {"empty": token_layout.EMPTY, "onset_base": token_layout.ONSET_BASE,
                            "offset_base": token_layout.OFFSET_BASE, "pitch_base": token_layout.PITCH_BASE,
                            "velocity_base": token_layout.VELOCITY_BASE, "time_bins": token_layout.TIME_BINS,
                            "seconds_per_bin": token_layout.SECONDS_PER_BIN,
                            "velocity_classes": list(token_layout.VELOCITY_CLASSES),
                            "tokens_per_note": token_layout.TOKENS_PER_NOTE},
            "num_codebooks": cfg.num_codebooks,
            "codebook_size": cfg.codebook_size,
            "codebook_vocab_size": cfg.codebook_vocab_size,
            "delay_pattern": "codebook k of frame t sits in audio row t + k (removed in the outputs' codes)",
            "sequence": "[timbre] [midi_1 .. midi_M] [separator zero row] [audio rows] [end zero row]",
        },
        "inputs": [
            {"name": "params", "shape": "dict of the arrays in params.npz, by name", "dtype": cfg.param_dtype},
            {"name": "midi", "shape": ["b", "m"], "dtype": "int32",
             "doc": "MIDI tokens, item b's in midi[b, :lengths[b]]; pad m + 1 to a multiple of prompt_bucket to reuse compiles"},
            {"name": "lengths", "shape": ["b"], "dtype": "int32", "doc": "0 <= lengths <= min(m, max_midi_tokens)"},
            {"name": "timbre", "shape": ["b", cfg.timbre_dim], "dtype": "float32", "doc": "CLAP embeddings"},
            {"name": "key_data", "shape": [2], "dtype": "uint32", "doc": "raw threefry key data (see seed)"},
        ],
        "outputs": [
            {"name": "codes", "shape": ["b", frames, cfg.num_codebooks], "dtype": "int32",
             "doc": "codec codes; codes[i, num_frames[i]:] == -1"},
            {"name": "num_frames", "shape": ["b"], "dtype": "int32"},
            {"name": "ended", "shape": ["b"], "dtype": "bool", "doc": "stopped on an end row (False: length cap)"},
            {"name": "rows", "shape": ["b", max_rows, cfg.num_channels], "dtype": "int32",
             "doc": "generated rows (delayed ids), zeros after the end"},
            {"name": "num_rows", "shape": ["b"], "dtype": "int32"},
        ],
    }
    if example_prompt is not None:
        info["example_prompt"] = {"file": EXAMPLE_PROMPT_FILE, **(example_source or {})}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if example_prompt is not None:
        np.savez(os.path.join(out_dir, EXAMPLE_PROMPT_FILE), **example_prompt)
    return info
