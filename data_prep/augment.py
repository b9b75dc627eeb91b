"""Digital-effect augmentation with pedalboard: seeded random chains, recorded and replayable.

The effect is part of the timbre, so one chain is applied to both clips of a pair. A chain is a
plain dict ({"chain": [{"name": ..., params...}, ...]}) stored in the record; `board` rebuilds the
exact pedalboard from it, so any record's audio can be re-rendered. Parameters are rounded to four
significant digits so the stored dict is the chain that ran. pedalboard has no overdrive or
flanger; they are the classic recipes built from its parts (a high-pass, mild drive and a tone
low-pass; a chorus with a 0.5-3 ms centre delay and feedback). Effects are applied in the order of
a guitarist's board (dynamics and tone, drive, modulation, time), whatever order they were drawn in.
"""
from __future__ import annotations

import numpy as np
import pedalboard

from .config import AUG_EFFECTS

AUG_VERSION = "pedalboard-v1"  # bump when a recipe or a parameter range changes
_ORDER = ("compressor", "eq", "filter", "distortion", "overdrive", "bitcrush", "chorus", "flanger",
          "phaser", "delay", "reverb")
assert sorted(_ORDER) == sorted(AUG_EFFECTS)
_LADDER_MODES = ("LPF12", "LPF24", "HPF12", "BPF12")


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def _log_uniform(rng, lo, hi) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _sample(name: str, rng: np.random.Generator) -> dict:
    u = rng.uniform
    if name == "distortion":
        p = {"drive_db": u(6, 30)}
    elif name == "overdrive":
        p = {"highpass_hz": u(80, 300), "drive_db": u(3, 12), "tone_hz": _log_uniform(rng, 1500, 6000)}
    elif name == "chorus":
        p = {"rate_hz": u(0.3, 3), "depth": u(0.1, 0.6), "centre_delay_ms": u(5, 15), "feedback": u(0, 0.3),
             "mix": u(0.3, 0.7)}
    elif name == "flanger":
        p = {"rate_hz": u(0.1, 1), "depth": u(0.2, 0.8), "centre_delay_ms": u(0.5, 3), "feedback": u(0.3, 0.8),
             "mix": u(0.4, 0.6)}
    elif name == "phaser":
        p = {"rate_hz": u(0.1, 2), "depth": u(0.3, 1), "centre_frequency_hz": _log_uniform(rng, 300, 2500),
             "feedback": u(0, 0.7), "mix": u(0.3, 0.8)}
    elif name == "delay":
        p = {"delay_seconds": u(0.05, 0.5), "feedback": u(0, 0.6), "mix": u(0.1, 0.5)}
    elif name == "reverb":
        p = {"room_size": u(0.1, 0.95), "damping": u(0, 1), "wet_level": u(0.1, 0.5), "dry_level": u(0.5, 1)}
    elif name == "compressor":
        p = {"threshold_db": u(-40, -10), "ratio": u(2, 10), "attack_ms": u(1, 30), "release_ms": u(50, 300)}
    elif name == "eq":
        p = {"low_hz": _log_uniform(rng, 60, 400), "low_db": u(-9, 9), "mid_hz": _log_uniform(rng, 200, 5000),
             "mid_db": u(-12, 12), "mid_q": u(0.5, 4), "high_hz": _log_uniform(rng, 2000, 10000), "high_db": u(-9, 9)}
    elif name == "filter":
        p = {"mode": _LADDER_MODES[int(rng.integers(len(_LADDER_MODES)))], "cutoff_hz": _log_uniform(rng, 300, 8000),
             "resonance": u(0, 0.7), "drive": u(1, 3)}
    elif name == "bitcrush":
        p = {"bit_depth": u(4, 12)}
    else:
        raise ValueError(f"unknown effect {name!r}; known: {AUG_EFFECTS}")
    return {"name": name, **{k: (v if isinstance(v, str) else _r(v)) for k, v in p.items()}}


def sample_chain(rng: np.random.Generator, *, effects: tuple[str, ...], max_effects: int,
                 dry_fraction: float) -> dict:
    """Draws an effect chain.

    Args:
      rng: the pair's generator (seeded from the job seed and the pair id).
      effects: the effects to draw from.
      max_effects: 1..max_effects effects per chain.
      dry_fraction: the probability of no effect at all.

    Returns:
      {"version": AUG_VERSION, "chain": [effect dicts in board order]}; the chain is empty when dry.
    """
    if rng.random() < dry_fraction:
        return {"version": AUG_VERSION, "chain": []}
    n = int(rng.integers(1, min(max_effects, len(effects)) + 1))
    names = sorted(rng.choice(sorted(effects), size=n, replace=False), key=_ORDER.index)
    return {"version": AUG_VERSION, "chain": [_sample(str(name), rng) for name in names]}


def _plugins(e: dict) -> list:
    name = e["name"]
    pb = pedalboard
    if name == "distortion":
        return [pb.Distortion(drive_db=e["drive_db"])]
    if name == "overdrive":
        return [pb.HighpassFilter(cutoff_frequency_hz=e["highpass_hz"]), pb.Distortion(drive_db=e["drive_db"]),
                pb.LowpassFilter(cutoff_frequency_hz=e["tone_hz"])]
    if name in ("chorus", "flanger"):
        return [pb.Chorus(rate_hz=e["rate_hz"], depth=e["depth"], centre_delay_ms=e["centre_delay_ms"],
                          feedback=e["feedback"], mix=e["mix"])]
    if name == "phaser":
        return [pb.Phaser(rate_hz=e["rate_hz"], depth=e["depth"], centre_frequency_hz=e["centre_frequency_hz"],
                          feedback=e["feedback"], mix=e["mix"])]
    if name == "delay":
        return [pb.Delay(delay_seconds=e["delay_seconds"], feedback=e["feedback"], mix=e["mix"])]
    if name == "reverb":
        return [pb.Reverb(room_size=e["room_size"], damping=e["damping"], wet_level=e["wet_level"],
                          dry_level=e["dry_level"])]
    if name == "compressor":
        return [pb.Compressor(threshold_db=e["threshold_db"], ratio=e["ratio"], attack_ms=e["attack_ms"],
                              release_ms=e["release_ms"])]
    if name == "eq":
        return [pb.LowShelfFilter(cutoff_frequency_hz=e["low_hz"], gain_db=e["low_db"]),
                pb.PeakFilter(cutoff_frequency_hz=e["mid_hz"], gain_db=e["mid_db"], q=e["mid_q"]),
                pb.HighShelfFilter(cutoff_frequency_hz=e["high_hz"], gain_db=e["high_db"])]
    if name == "filter":
        return [pb.LadderFilter(mode=getattr(pb.LadderFilter.Mode, e["mode"]), cutoff_hz=e["cutoff_hz"],
                                resonance=e["resonance"], drive=e["drive"])]
    if name == "bitcrush":
        return [pb.Bitcrush(bit_depth=e["bit_depth"])]
    raise ValueError(f"unknown effect {name!r} in a stored chain; known: {AUG_EFFECTS}")


def board(augmentation: dict) -> pedalboard.Pedalboard:
    """The pedalboard of a stored chain.

    Raises:
      ValueError: the chain's version or an effect is unknown to this code.
    """
    if augmentation.get("chain") and augmentation.get("version") != AUG_VERSION:
        raise ValueError(f"augmentation version {augmentation.get('version')!r}, this code replays {AUG_VERSION}")
    return pedalboard.Pedalboard([p for e in augmentation.get("chain", []) for p in _plugins(e)])


def apply(audio: np.ndarray, sample_rate: int, fx: pedalboard.Pedalboard) -> np.ndarray:
    """Runs a mono clip through a board from a clean state (same input, same output)."""
    if len(fx) == 0:
        return audio
    return fx(audio[None, :], float(sample_rate), reset=True)[0]
