"""The offline timbre embedding `demo-spectral`: it tells General MIDI instruments apart, whatever they play.

Each instrument plays several procedural phrases (different notes, different registers); an
embedding must sit closer to the same instrument's other clips than to other instruments' clips
of the same phrases. It is CLAP-shaped (512-d, unit norm), deterministic, audio only.
"""
import numpy as np
import pytest

from tokensynth_jax.audio import encoders
from tokensynth_prep import instruments, midi_sources, render
from tokensynth_prep.config import PrepConfig
from tokensynth_jax.inference import timbre
from tokensynth_jax.audio import spectral_embedder

RATE = 16000
PROGRAMS = (0, 24, 40, 56, 71, 73)  # piano, nylon guitar, violin, trumpet, clarinet, flute
PHRASES = range(6)


@pytest.fixture(scope="module")
def clips():
    cfg = PrepConfig(output_dir="unused", programs=PROGRAMS, table_pitches=(36, 96, 4), table_velocities=(60, 110),
                     valid_fraction=0, test_fraction=0)
    out = {}
    for spec in instruments.list_instruments(cfg):
        table = instruments.build_note_table(spec, RATE, cfg)
        for i in PHRASES:
            seg = midi_sources.procedural_segment(3, i, 16)
            audio = render.render(seg.notes, table, transpose=table.transpose_to_fit(seg.notes[:, 2]))
            out[spec.params["program"], i] = render.normalise(audio, peak=0.9, silence_peak=1e-4, what="clip")
    return out


def test_same_instrument_is_closer_than_other_instruments(clips):
    keys = sorted(clips)
    emb = spectral_embedder.SpectralEmbedder().embed(np.stack([clips[k] for k in keys]), RATE)
    assert emb.shape == (len(keys), 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    program = np.array([k[0] for k in keys])
    cos = emb @ emb.T
    same = (program[:, None] == program[None, :]) & ~np.eye(len(keys), dtype=bool)
    other = program[:, None] != program[None, :]
    assert cos[same].mean() > cos[other].mean() + 0.3
    for p in PROGRAMS:  # every instrument, on average, is nearest to itself
        mine = program == p
        within = cos[np.ix_(mine, mine)][~np.eye(mine.sum(), dtype=bool)].mean()
        assert all(within > cos[np.ix_(mine, program == q)].mean() for q in PROGRAMS if q != p), p
    np.fill_diagonal(cos, -np.inf)
    assert (program[cos.argmax(axis=1)] == program).mean() >= 0.75  # nearest clip: same instrument


def test_deterministic_and_independent_of_level_and_rate(clips):
    embedder = spectral_embedder.SpectralEmbedder()
    x = clips[40, 0]
    first = embedder.embed(x[None], RATE)
    np.testing.assert_array_equal(first, spectral_embedder.SpectralEmbedder().embed(x[None], RATE))
    np.testing.assert_allclose(embedder.embed(0.1 * x[None], RATE), first, atol=1e-5)  # loudness is not timbre
    from scipy.signal import resample_poly

    at_32k = resample_poly(x, 2, 1)
    assert float(embedder.embed(at_32k[None], 32000)[0] @ first[0]) > 0.99


def test_silence_has_a_defined_embedding_and_text_is_refused():
    embedder = spectral_embedder.SpectralEmbedder()
    silent = embedder.embed(np.zeros((1, RATE)), RATE)
    assert np.isfinite(silent).all() and abs(np.linalg.norm(silent) - 1) < 1e-5
    with pytest.raises(spectral_embedder.SpectralEmbedderError, match="finite mono audio"):
        spectral_embedder.statistics(np.full(RATE, np.nan), RATE)
    # Through the loaders synthesis uses: audio works, text is a clear error naming what is needed.
    clap = timbre.load_clap("demo-spectral", offline=True)
    assert clap.dim == 512 and clap.model_id == "demo-spectral|codec-rate"
    tone = 0.5 * np.sin(2 * np.pi * 220 * np.arange(RATE) / RATE)
    assert timbre.audio_embedding(clap, tone, RATE).shape == (512,)
    with pytest.raises(timbre.TimbreError, match="text-to-instrument needs a CLAP checkpoint"):
        timbre.text_embedding(clap, "a warm cello")
    encoders.check_clap("demo-spectral", offline=True)  # no download to check
