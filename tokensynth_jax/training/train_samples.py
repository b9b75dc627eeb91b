"""Samples while training: generations from held-out prompts, written as tokens (and audio).

A loss curve hides what a listen shows at once (silence, loops, clips that never end), so every
`train.sample_every` steps the loop generates from the first `train.sample_count` records of the
eval set (the training set when there is none) with the current parameters, and writes
`samples/step_N/sample_I.npz` (generated codes, the record's codes, MIDI tokens, timbre) and,
when the run's codec can be loaded, `sample_I.wav`. The decoded clips also go back to the loop,
which puts them in TensorBoard as audio and spectrogram images (`sample_I/generated` each time,
`sample_I/target`, the record's own codes decoded, the first time). It logs how many generated
codes equal the record's (`sample_match` 1.0: the model reproduces the clip; what an overfit run
should reach).

Parameters are gathered to the host first (`process_allgather`, which every process calls), and
process 0 generates on one local device, so this works on any mesh and any number of processes.
"""
from __future__ import annotations

import itertools
import logging
import os

import grain
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.inference import sampling
from tokensynth_jax.tokens import records, token_layout
from tokensynth_jax.training import input_pipeline

log = logging.getLogger("tokensynth.train")


def _first_records(paths, count: int) -> list[records.PairRecord]:
    """The first `count` readable records (a damaged one is passed over, as training passes over it)."""
    source = grain.sources.ArrayRecordDataSource(input_pipeline.expand_paths(paths))
    return list(itertools.islice(input_pipeline.readable_records(source), count))


class SampleWriter:
    """Greedy or top-p generations of fixed prompts, comparable from one sample step to the next."""

    def __init__(self, config, cfg: ModelConfig, workdir: str):
        tc = config.train
        self.cfg, self.workdir = cfg, workdir
        self.every, self.top_p = tc.sample_every, tc.sample_top_p
        self.codec_name = config.codec.name if tc.sample_audio else None
        self.records = _first_records(config.data.eval_paths or config.data.paths, tc.sample_count)
        self._codec = None
        self._targets_sent = False  # the records' own clips go to TensorBoard once
        # The rows each record needs, capped by the positions the model has after its prompt.
        self.max_rows = max(
            min(token_layout.audio_rows_for_frames(len(r.codes), cfg.num_codebooks) + 1,
                cfg.max_len - 1 - len(token_layout.prompt_rows(r.midi_tokens, cfg.num_codebooks)))
            for r in self.records
        )

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, step: int, graphdef, state) -> tuple[dict, list]:
        """Writes the samples of `step`.

        Returns:
          (metrics, clips) on process 0, ({}, []) on the others; clips are (tag, audio, sample
          rate) for TensorBoard, none when the codec does not load.
        """
        model, _ = nnx.merge(graphdef, state)
        host_params = multihost_utils.process_allgather(nnx.state(model), tiled=True)  # every process calls this
        if jax.process_index() != 0:
            return {}, []
        local = nnx.merge(nnx.graphdef(model), jax.device_put(host_params, jax.local_devices()[0]))
        sampler = sampling.TopP(self.top_p) if self.top_p else sampling.Greedy()
        gen = sampling.generate(
            local, [r.midi_tokens for r in self.records], np.stack([r.timbre for r in self.records]).astype(np.float32),
            sampler=sampler, seed=step, max_rows=self.max_rows,
        )
        out = os.path.join(self.workdir, "samples", f"step_{step}")
        os.makedirs(out, exist_ok=True)
        matches, clips = [], []
        for i, rec in enumerate(self.records):
            codes = gen.codes[i, : gen.num_frames[i]]
            target = np.asarray(rec.codes, np.int64)
            n = min(len(codes), len(target))
            matches.append(float((codes[:n] == target[:n]).sum()) / target.size)
            np.savez(os.path.join(out, f"sample_{i}.npz"), codes=codes, target_codes=target,
                     midi_tokens=np.asarray(rec.midi_tokens), timbre=np.asarray(rec.timbre), pair_id=rec.pair_id)
            audio = self._decode(codes)
            if audio is not None:
                from scipy.io import wavfile

                wavfile.write(os.path.join(out, f"sample_{i}.wav"), self._codec.info.sample_rate, audio)
                clips.append((f"sample_{i}/generated", audio, self._codec.info.sample_rate))
            target_audio = None if self._targets_sent else self._decode(target)
            if target_audio is not None:
                clips.append((f"sample_{i}/target", target_audio, self._codec.info.sample_rate))
        self._targets_sent = True
        metrics = {"sample_match": float(np.mean(matches)), "sample_frames": float(np.mean(gen.num_frames)),
                   "sample_ended": float(np.mean(gen.ended))}
        return metrics, clips

    def _decode(self, codes: np.ndarray) -> np.ndarray | None:
        """float32 audio when the codec loads; a codec that can't load turns audio off, once."""
        if self.codec_name is None or len(codes) == 0:
            return None
        try:
            if self._codec is None:
                from tokensynth_jax.audio import (
                    encoders,  # torch + transformers: only when audio samples are on
                )

                self._codec = encoders.Codec(self.codec_name, batch_size=1, offline=True)
            return np.asarray(self._codec.decode(codes[None])[0], np.float32)
        except Exception as e:  # a missing codec must not stop training: tokens are still written
            log.warning("samples: no audio (%s: %s); writing tokens only", self.codec_name, e)
            self.codec_name = None
            return None
