"""Runs a `tokensynth export` directory with jax and numpy only (no tokensynth_jax needed).

    pip install jax flatbuffers   # jax reads a serialized export through flatbuffers, not among its requirements
    python OUT/load_exported.py OUT --prompt OUT/example_prompt.npz --timbre clap.npy --seed 0 --out codes.npz

or, from Python (with OUT on sys.path or this file copied anywhere):

    from load_exported import ExportedGenerator
    gen = ExportedGenerator("OUT")
    result = gen(midi, lengths, timbre, seed=0)   # dict of numpy arrays: codes, num_frames, ...

The prompt .npz holds `midi` [N, M] int32 MIDI tokens (right-padded), `lengths` [N] int32, and
optionally `timbre` [N, T] float32 CLAP embeddings. `export.json` beside the artifact documents
the token layout, the sampler, the inputs and the outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

FORMAT = "tokensynth-jax-export"
FORMAT_VERSION = 1


class ExportedGenerator:
    """The exported generation function with its parameters; call it with token arrays and a seed."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, "export.json")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{directory}: not a tokensynth export (no export.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT or self.meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r} v{self.meta.get('version')}, "
                             f"this loader reads {FORMAT!r} up to v{FORMAT_VERSION}")
        files = self.meta["files"]
        try:
            import flatbuffers  # noqa: F401  jax.export.deserialize needs it; jax does not require it
        except ImportError:
            raise ImportError("reading a jax.export artifact needs the flatbuffers package: pip install flatbuffers") from None
        with open(os.path.join(directory, files["exported"]), "rb") as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        params_path = os.path.join(directory, files["params"])
        with np.load(params_path) as npz:
            self.params = {name: npz[name] for name in npz.files}
        # The exported argument tree names every parameter it expects, with its dtype.
        args, _ = jax.tree_util.tree_unflatten(self.exported.in_tree, self.exported.in_avals)
        expected = set(args[0])
        missing, unexpected = sorted(expected - set(self.params)), sorted(set(self.params) - expected)
        if missing or unexpected:
            raise ValueError(f"{params_path}: missing parameters {missing}, unexpected {unexpected}")
        for name, aval in args[0].items():  # numpy has no bfloat16: np.savez kept such weights as raw bytes
            value = self.params[name]
            if value.dtype.kind == "V" and value.dtype.itemsize == aval.dtype.itemsize:
                self.params[name] = value.view(aval.dtype)
        self._call = jax.jit(self.exported.call)  # compiled once per (batch, prompt width)

    def __call__(self, midi, lengths, timbre, *, seed: int = 0) -> dict:
        """Generates codes for a batch of tokenized prompts.

        Args:
          midi: [N, M] int MIDI tokens; item i's are midi[i, :lengths[i]].
          lengths: [N] ints.
          timbre: [N, T] or [T] float CLAP embeddings.
          seed: as `tokensynth synthesize --seed` (threefry PRNGKey(seed)).
        Returns:
          codes [N, F, K] (-1 after each item's end, F = max frames), num_frames, ended, rows, num_rows.
        """
        midi = np.asarray(midi)
        lengths = np.asarray(lengths).astype(np.int32).reshape(-1)
        if midi.ndim != 2 or not np.issubdtype(midi.dtype, np.integer):
            raise ValueError(f"midi must be an int array [N, M], got {midi.dtype} {midi.shape}")
        if lengths.shape[0] != midi.shape[0]:
            raise ValueError(f"{lengths.shape[0]} lengths for {midi.shape[0]} prompts")
        limit = min(midi.shape[1], self.meta["max_midi_tokens"])
        if np.any(lengths < 0) or np.any(lengths > limit):
            raise ValueError(f"lengths must lie in [0, {limit}] (prompt width, model's max_midi_tokens), got {lengths}")
        timbre_dim = self.meta["model"]["timbre_dim"]
        timbre = np.asarray(timbre, np.float32)
        timbre = np.repeat(timbre[None], len(midi), 0) if timbre.ndim == 1 else timbre
        if timbre.shape != (len(midi), timbre_dim):
            raise ValueError(f"timbre of shape {timbre.shape}, expected [{len(midi)}, {timbre_dim}]")
        # Pad the width as the in-process sampler does (m + 1 a multiple of the bucket): same
        # shapes, so the same compiled code and bitwise the same tokens.
        bucket = self.meta["prompt_bucket"]
        width = -(-(int(lengths.max(initial=0)) + 1) // bucket) * bucket - 1
        padded = np.zeros((len(midi), width), np.int32)
        keep = min(width, midi.shape[1])
        padded[:, :keep] = midi[:, :keep]  # tokens past an item's length are ignored
        key_data = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
        out = self._call(self.params, padded, lengths, timbre, key_data)
        codes, num_frames, ended, rows, num_rows = (np.asarray(x) for x in out)
        return {"codes": codes[:, : int(num_frames.max(initial=0))], "num_frames": num_frames, "ended": ended,
                "rows": rows, "num_rows": num_rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a `tokensynth export` output directory")
    parser.add_argument("--prompt", required=True, help=".npz with midi [N, M], lengths [N] (and timbre [N, T])")
    parser.add_argument("--timbre", help=".npy CLAP embedding [T] or [N, T] (default: the prompt's `timbre`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the outputs to this .npz")
    args = parser.parse_args(argv)
    try:  # what a user gives (files, the directory, a missing package) fails in one line, exit 2
        with np.load(args.prompt) as npz:
            prompt = {k: npz[k] for k in npz.files}
        if args.timbre is not None:
            timbre = np.load(args.timbre)
        elif "timbre" in prompt:
            timbre = prompt["timbre"]
        else:
            parser.error(f"{args.prompt} has no `timbre`; pass --timbre E.npy")
        generator = ExportedGenerator(args.directory)
    except (OSError, ValueError, ImportError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    result = generator(prompt["midi"], prompt["lengths"], timbre, seed=args.seed)
    if args.out:
        np.savez(args.out, **result)
    for i, (frames, ended) in enumerate(zip(result["num_frames"], result["ended"])):
        print(f"item {i}: {frames} frames ({'end row' if ended else 'length cap'})")
    print(f"codes {result['codes'].shape}" + (f" written to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
