"""Generation: greedy parity with the reference's `synthesize`, batching, end rows and length
caps, the samplers' candidate sets, seeds, temperature, guidance, and the delay pattern."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pretty_midi
import pytest
import torch
from conftest import model_from_params, randomize
from flax import nnx

from tokensynth_jax.config import REFERENCE, ModelConfig
from tokensynth_jax.inference import sampling
from tokensynth_jax.inference.sampling import CFG, FirstNoteGuidance, Greedy, TopK, TopP
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.tokens import token_layout
from tokensynth_jax.tokens.midi_tokens import tokenize_midi

TINY = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=4, codebook_size=37, max_len=97,
                   timbre_dim=29, timbre_hidden=53)
REF_MAX_ROWS = 449  # the reference keeps at most 449 audio rows: it drops the last of its 450 samples


def _midi(path, tracks):
    """tracks: [(is_drum, program, [(start, end, pitch, velocity), ...]), ...]."""
    pm = pretty_midi.PrettyMIDI(resolution=500)  # a 1 ms grid at 120 bpm
    for is_drum, program, notes in tracks:
        inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
        inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
        pm.instruments.append(inst)
    pm.write(str(path))
    return str(path)


def _scale(n, start, step, dur, pitch, vel):
    return [(start + i * step, start + i * step + dur, pitch + i % 12, min(127, vel + 7 * i % 40)) for i in range(n)]


MIDI_FILES = {
    "one_track": [(False, 0, _scale(7, 0.25, 0.5, 0.4, 60, 60))],
    "two_tracks": [(False, 0, _scale(13, 0.0, 0.3, 0.9, 64, 30)), (False, 33, _scale(5, 0.1, 0.9, 0.7, 36, 90))],
    "drums_and_a_late_note": [(True, 0, _scale(9, 0.0, 0.25, 0.1, 36, 100)),
                              (False, 0, _scale(6, 0.2, 0.6, 0.5, 72, 20) + [(4.5, 5.5, 50, 80)]),
                              (False, 40, [(3.0, 4.0, 55, 127)])],
    # 150 notes = 600 MIDI tokens: the reference's max_len, not its 450 rows, bounds the audio
    "long_prompt": [(False, 0, _scale(150, 0.0, 0.03, 0.05, 48, 50))],
}


@pytest.fixture(scope="module")
def midi_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("midi")
    return {name: _midi(root / f"{name}.mid", tracks) for name, tracks in MIDI_FILES.items()}


@pytest.fixture(scope="module")
def tiny():
    """`get(**changes)` -> a randomised TINY model, built once per config."""
    cache = {}

    def get(seed=1, **changes):
        key = (seed, tuple(sorted(changes.items())))
        if key not in cache:
            cache[key] = randomize(TokenSynth(TINY.replace(**changes), rngs=nnx.Rngs(0)), seed=seed)
        return cache[key]

    return get


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, token_layout.MIDI_VOCAB_SIZE, n).astype(np.int32) for n in lengths]


def _timbre(batch, dim=TINY.timbre_dim, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, dim)).astype(np.float32)


def assert_same_generation(a, b):
    for field in ("codes", "num_frames", "rows", "num_rows", "ended"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


# --- parity with the reference ------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["causal", "tokensynth-0.0.4"])
@pytest.mark.parametrize("name", sorted(MIDI_FILES))
def test_greedy_matches_reference_synthesize(official_pair, reference, midi_files, name, attention):
    """The reference's top-p with a tiny p keeps one candidate per channel: greedy decoding."""
    ref, model = official_pair("timbre", attention)
    path = midi_files[name]
    clap = _timbre(1, dim=512, seed=len(name))
    # The reference checks its length budget against the position left over from its previous
    # call even when it starts afresh, so a long prompt after a long generation fails its assert.
    ref.current_length = 0
    with torch.no_grad():
        expected = ref.synthesize(torch.from_numpy(clap), path, top_p=1e-9)[0].numpy()
    tokens = tokenize_midi(path, compat="tokensynth-0.0.4").tokens
    np.testing.assert_array_equal(tokens, reference.utils.get_tokens_from_midi(path).reshape(-1).numpy())
    gen = sampling.generate(model, [tokens], clap, max_rows=REF_MAX_ROWS)
    codes = gen.codes[0, : gen.num_frames[0]]
    assert not gen.ended[0] and len(np.unique(codes)) > 10  # random weights: no end row, varied codes
    if name == "long_prompt":
        # Both stop at the last learned position; the reference then drops its last sampled row.
        assert 1 + len(tokens) + 1 + gen.num_rows[0] == REFERENCE.max_len
        assert gen.num_frames[0] == expected.shape[0] + 1
        codes = codes[: expected.shape[0]]
    else:
        assert gen.num_rows[0] == REF_MAX_ROWS
    np.testing.assert_array_equal(codes, expected)


# --- batching, end rows, length caps -------------------------------------------------------------
def test_batched_greedy_equals_one_at_a_time(tiny):
    """Prompts of 3, 40 and 17 MIDI tokens: different paddings, prompt buckets and row caps."""
    model = tiny()
    prompts, timbre = _prompts([3, 40, 17]), _timbre(3)
    batch = sampling.generate(model, prompts, timbre, max_rows=70)
    caps = [min(70, TINY.max_len - 1 - (len(p) + 1)) for p in prompts]
    assert batch.num_rows.tolist() == caps == [70, 55, 70]
    assert not batch.ended.any()
    for b, p in enumerate(prompts):
        alone = sampling.generate(model, [p], timbre[b : b + 1], max_rows=70)
        assert alone.num_rows[0] == batch.num_rows[b] and alone.ended[0] == batch.ended[b]
        np.testing.assert_array_equal(alone.rows[0], batch.rows[b])
        frames = alone.num_frames[0]
        assert frames == batch.num_frames[b] == caps[b] - (TINY.num_codebooks - 1)
        np.testing.assert_array_equal(alone.codes[0, :frames], batch.codes[b, :frames])
        assert (batch.codes[b, frames:] == -1).all()
        assert not batch.rows[b, caps[b]:].any()  # nothing written past the item's cap


@pytest.mark.parametrize("sampler", [TopK(5), TopP(0.8)])
def test_batched_sampling_item_0_equals_alone(tiny, sampler):
    model = tiny()
    prompts, timbre = _prompts([9, 30]), _timbre(2)
    batch = sampling.generate(model, prompts, timbre, sampler=sampler, seed=3, max_rows=40)
    alone = sampling.generate(model, prompts[:1], timbre[:1], sampler=sampler, seed=3, max_rows=40)
    np.testing.assert_array_equal(alone.rows[0], batch.rows[0])
    greedy = sampling.generate(model, prompts[:1], timbre[:1], max_rows=40)
    assert not np.array_equal(alone.rows[0], greedy.rows[0])  # it did sample


def test_prompt_too_long_for_max_len_is_an_error(tiny):
    # 92 MIDI rows + separator leave 96 - 93 = 3 audio rows, fewer than the 4 the delay needs.
    with pytest.raises(ValueError, match="item 1: 92 MIDI tokens leave 3 of 97 positions"):
        sampling.generate(tiny(), _prompts([3, 92]), _timbre(2), max_rows=70)


def _ending_model(end_position, channels=None):
    """A model whose output is the all-zero end row at every position >= `end_position`.

    (Zero on the given channels only, if `channels` lists some.)

    Residual dimension 0 is kept empty (zero in every embedding and every block output) except in
    the position embeddings from `end_position` on, where it is large. After the final LayerNorm
    that dimension is about sqrt(D - 1) there and about 0 elsewhere, and the head reads it with a
    large weight (and a negative bias) into the logit of id 0 of every channel.
    """
    model = TokenSynth(TINY, rngs=nnx.Rngs(0))  # the default small init: other logits stay near 0
    p = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    p["midi_embed"][:, 0] = 0
    p["codebook_embed"][..., 0] = 0
    p["pos_embed"][:, 0] = 0
    p["pos_embed"][end_position:, 0] = 50.0
    p["timbre_fc2"]["kernel"][:, 0] = p["timbre_fc2"]["bias"][0] = 0
    for block in p["blocks"].values():
        block["attn"]["out"]["kernel"][..., 0] = block["attn"]["out"]["bias"][0] = 0
        block["mlp"]["fc2"]["kernel"][:, 0] = block["mlp"]["fc2"]["bias"][0] = 0
    for c, (start, _) in enumerate(TINY.channel_slices()):
        if channels is not None and c not in channels:
            continue
        p["head"]["kernel"][0, start] = 10.0
        p["head"]["bias"][start] = -5.0
    return model_from_params(TINY, p)


@pytest.mark.parametrize("sampler", [Greedy(), TopK(3)])
def test_generation_stops_at_the_end_row(sampler):
    end_position = 45
    model = _ending_model(end_position)
    prompts = _prompts([8, 24, 1])
    gen = sampling.generate(model, prompts, _timbre(3), sampler=sampler, max_rows=60)
    # Audio row r is sampled at position M + 1 + r (the timbre is position 0, the separator M + 1).
    expected = [end_position - (len(p) + 1) for p in prompts]
    assert gen.num_rows.tolist() == expected == [36, 20, 43]
    assert gen.ended.all()
    for b, n in enumerate(expected):
        assert gen.rows[b, :n].any(axis=-1).all()  # no end row before the end
        assert not gen.rows[b, n:].any()
        frames = n - (TINY.num_codebooks - 1)
        assert gen.num_frames[b] == frames
        assert (gen.codes[b, :frames] >= 0).all() and (gen.codes[b, frames:] == -1).all()
    # the cap still applies when it comes first
    capped = sampling.generate(model, prompts, _timbre(3), sampler=sampler, max_rows=30)
    assert capped.num_rows.tolist() == [30, 20, 30] and capped.ended.tolist() == [False, True, False]


@pytest.mark.parametrize("sampler", [Greedy(), TopP(0.9)])
def test_min_frames_hold_the_end_row_off_per_item(sampler):
    model = _ending_model(30)  # the end row at every position >= 30
    prompts, timbre = _prompts([8, 24, 1]), _timbre(3)
    free = sampling.generate(model, prompts, timbre, sampler=sampler, max_rows=60)
    assert free.num_frames.tolist() == [18, 2, 25] and free.ended.all()  # 30 - (M + 1) rows, less the delay
    held = sampling.generate(model, prompts, timbre, sampler=sampler, max_rows=60, min_frames=[25, 10, 0])
    assert held.num_frames.tolist() == [25, 10, 25] and held.ended.all()  # then the end row, at once
    for b, n in enumerate(held.num_rows):
        assert held.rows[b, :n, 1:].any(axis=-1).all() and not held.rows[b, n:].any()
        assert (held.rows[b, :n - 3, 1] > 0).all() and (held.rows[b, 3:n, 4] > 0).all()  # the delay pattern holds
    # Per-item row caps bound the rows, and a minimum never goes past what the cap leaves.
    capped = sampling.generate(model, prompts, timbre, sampler=sampler, max_rows=60, row_caps=[20, 60, 9],
                               min_frames=[40, 0, 40])
    assert capped.num_rows.tolist() == [20, 5, 9] and capped.ended.tolist() == [False, True, False]


def test_silent_codebooks_with_a_midi_token_are_not_an_end_row():
    model = _ending_model(30, channels=range(1, TINY.num_channels))
    gen = sampling.generate(model, _prompts([8]), _timbre(1), max_rows=60)
    assert gen.num_rows.tolist() == [60] and not gen.ended[0]
    tail = gen.rows[0, 30 - 9 :]  # sampled at positions >= 30
    assert not tail[:, 1:].any() and tail[:, 0].all()


# --- samplers -----------------------------------------------------------------------------------
def _kept(filtered):
    return [set(np.flatnonzero(np.isfinite(row))) for row in np.asarray(filtered).reshape(-1, np.shape(filtered)[-1])]


@pytest.fixture(scope="module")
def full_logits():
    return np.random.default_rng(4).normal(scale=3.0, size=(1, REFERENCE.output_size)).astype(np.float32)


def _reference_candidates(reference, logits, **kwargs):
    """The ids the reference's `utils.sample` may draw on each channel, read off its multinomials."""
    seen = []

    def spy(probs, num_samples):
        seen.append(probs.clone().numpy()[0])
        return torch.zeros((probs.shape[0], num_samples), dtype=torch.long)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "multinomial", spy)
        reference.utils.sample(torch.from_numpy(logits), midi_vocab_size=REFERENCE.midi_vocab_size,
                               audio_vocab_size=REFERENCE.codebook_vocab_size, **kwargs)
    assert len(seen) == REFERENCE.num_channels
    out = []
    for (lo, hi), probs in zip(REFERENCE.channel_slices(), seen):
        order = np.argsort(-logits[0, lo:hi], kind="stable")  # the reference sorts descending
        out.append(set(order[: np.count_nonzero(probs)]))
    return out


def _our_candidates(sampler, logits):
    midi = logits[:, : REFERENCE.midi_vocab_size]
    books = logits[:, REFERENCE.midi_vocab_size :].reshape(1, REFERENCE.num_codebooks, -1)
    return _kept(sampler.filter(jnp.asarray(midi), True)) + _kept(sampler.filter(jnp.asarray(books), False))


@pytest.mark.parametrize("k", [1, 2, 7])
def test_top_k_candidates_match_the_reference(reference, full_logits, k):
    expected = _reference_candidates(reference, full_logits, top_k=k)
    assert [len(s) for s in expected] == [k] + [k + 1] * REFERENCE.num_codebooks  # the reference's k + 1
    assert _our_candidates(TopK(k, reference_quirks=True), full_logits) == expected
    ours = _our_candidates(TopK(k), full_logits)  # k on every channel
    assert ours[0] == expected[0]
    for mine, theirs in zip(ours[1:], expected[1:]):
        assert len(mine) == k and mine < theirs


@pytest.mark.parametrize("p", [1e-9, 0.3, 0.9, 0.999])
def test_top_p_candidates_match_the_reference(reference, full_logits, p):
    expected = _reference_candidates(reference, full_logits, top_p=p)
    assert _our_candidates(TopP(p, reference_quirks=True), full_logits) == expected
    # away from exact ties of the cumulative sum, >= and > keep the same sets
    assert _our_candidates(TopP(p), full_logits) == expected


def test_top_p_boundary_is_inclusive_except_for_quirky_codebooks():
    logits = jnp.asarray([[1.0, 3.0, -1.0, 2.0, 0.5]])
    # The cumulative probability after the two most likely ids, computed as the sort filter does
    # (the bisecting filter sums in another order, so an exact tie is the sort's alone; below).
    cum = jnp.cumsum(jax.nn.softmax(-jnp.sort(-logits, axis=-1), axis=-1), axis=-1)
    p = float(cum[0, 1])
    assert _kept(TopP(p, method="sort").filter(logits, True)) == [{1, 3}]
    assert _kept(TopP(p, method="sort").filter(logits, False)) == [{1, 3}]
    assert _kept(TopP(p, reference_quirks=True, method="sort").filter(logits, True)) == [{1, 3}]  # >= for MIDI
    assert _kept(TopP(p, reference_quirks=True, method="sort").filter(logits, False)) == [{1, 3, 0}]  # > for codebooks
    for method in ("sort", "bisect"):
        assert _kept(TopP(1.0, method=method).filter(logits, False)) == [{0, 1, 2, 3, 4}]
        assert _kept(TopP(p - 1e-6, method=method).filter(logits, False)) == [{1, 3}]
        assert _kept(TopP(p + 1e-6, method=method).filter(logits, False)) == [{1, 3, 0}]


def _rounding_close(logits, p, margin=1e-5):
    """Channels whose nucleus boundary lies within float32 rounding of p: any sum order decides."""
    out = []
    for lo, hi in REFERENCE.channel_slices():
        x = np.sort(logits[0, lo:hi].astype(np.float64))[::-1]
        cum = np.cumsum(np.exp(x - x[0])) / np.exp(x - x[0]).sum()
        out.append(bool(np.abs(cum - p).min() < margin))
    return out


@pytest.mark.parametrize("scale", [0.02, 1.0, 3.0])
def test_bisecting_filters_keep_the_sorted_candidates(scale):
    """On the reference's full output head, with ties (rounded logits) and without. Top-k is exact;
    top-p agrees wherever its boundary is not within float32 rounding of p."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=scale, size=(2, REFERENCE.output_size)).astype(np.float32)
    logits[1] = np.round(logits[1] * 4) / 4  # many exact ties, and -0.0 beside +0.0
    samplers = [TopK(k, reference_quirks=q) for k in (1, 7, 300) for q in (False, True)]
    samplers += [TopP(p, reference_quirks=q) for p in (1e-9, 0.3, 0.9, 0.999) for q in (False, True)]
    compared = 0
    for sampler in samplers:
        fast, slow = (dataclasses.replace(sampler, method=m) for m in ("bisect", "sort"))
        for b in range(2):
            row = logits[b : b + 1]
            skip = _rounding_close(row, sampler.p) if isinstance(sampler, TopP) else [False] * REFERENCE.num_channels
            for c, (mine, theirs) in enumerate(zip(_our_candidates(fast, row), _our_candidates(slow, row))):
                if not skip[c]:
                    assert mine == theirs, (sampler, b, c)
                    compared += 1
    assert compared > 0.75 * len(samplers) * 2 * REFERENCE.num_channels
    assert sampling.filter_method("auto") == "bisect"  # this CPU


def test_top_k_and_temperature_on_hand_made_logits():
    logits = jnp.asarray([[0.5, 4.0, -2.0, 3.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    assert _kept(TopK(2).filter(logits, True)) == [{1, 3}, {0, 1}]
    assert _kept(TopK(2, reference_quirks=True).filter(logits, False)) == [{1, 3, 4}, {0, 1, 2}]
    assert _kept(TopK(99).filter(logits, False)) == [set(range(5))] * 2  # k above the vocabulary
    scaled = np.asarray(TopK(2, temperature=0.5).filter(logits, True))
    np.testing.assert_allclose(scaled[0, [1, 3]], [8.0, 6.0])
    scaled = np.asarray(TopP(0.5, temperature=4.0).filter(logits, True))
    np.testing.assert_allclose(scaled[1, 0], 9.0 / 4.0)
    # the reference has no temperature: its mode leaves the logits as they are
    np.testing.assert_array_equal(np.asarray(TopK(2, temperature=0.5, reference_quirks=True).filter(logits, True))[0, [1, 3]], [4.0, 3.0])
    for bad in (lambda: TopK(0), lambda: TopP(0.0), lambda: TopP(1.5)):
        with pytest.raises(ValueError):
            bad()


def test_seeds(tiny):
    model = tiny()
    prompts, timbre = _prompts([6]), _timbre(1)
    run = lambda sampler, seed: sampling.generate(model, prompts, timbre, sampler=sampler, seed=seed, max_rows=24).rows
    for sampler in (TopK(8), TopP(0.95)):
        np.testing.assert_array_equal(run(sampler, 0), run(sampler, 0))
        assert not np.array_equal(run(sampler, 0), run(sampler, 1))


def test_temperature(tiny):
    model = tiny()
    prompts, timbre = _prompts([6, 11]), _timbre(2)
    run = lambda sampler: sampling.generate(model, prompts, timbre, sampler=sampler, seed=5, max_rows=24).rows
    greedy = run(Greedy())
    np.testing.assert_array_equal(run(TopK(2000, temperature=1e-6)), greedy)  # all candidates, but cold
    hot, warm = run(TopK(2000, temperature=100.0)), run(TopK(2000, temperature=1.0))
    assert not np.array_equal(hot, warm)
    # near-uniform draws agree with greedy about as often as chance does
    assert (hot[..., 1:] == greedy[..., 1:]).mean() < (warm[..., 1:] == greedy[..., 1:]).mean()


# --- the public loop and bf16 parameters -------------------------------------------------------
def test_decode_loop_is_the_loop_generate_runs(tiny):
    """`decode_loop` (what export traces) under jit: a DecodeState pytree whose rows are generate's."""
    model = tiny()
    prompts, timbre = _prompts([5, 19]), _timbre(2)
    sampler = TopP(0.9)
    gen = sampling.generate(model, prompts, timbre, sampler=sampler, seed=4, max_rows=20)
    rows, pads, caps = sampling.prepare_prompts(prompts, model.cfg, 20)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, rows, pads, caps, timbre, key):
        return sampling.decode_loop(nnx.merge(graphdef, state), rows, pads, caps, timbre, key, sampler=sampler,
                                    max_rows=20)

    final = run(state, rows, pads, caps, timbre, jax.random.PRNGKey(4))
    assert isinstance(final, sampling.DecodeState) and int(final.step) == 20  # both items ran to max_rows
    assert len(final.cache) == model.cfg.num_layers and final.uncond_cache == ()
    for field in ("rows", "num_rows", "ended"):
        np.testing.assert_array_equal(np.asarray(getattr(final, field)), getattr(gen, field), err_msg=field)
    # a pytree: jax maps over its arrays and rebuilds it
    assert isinstance(jax.tree.map(lambda x: x, final), sampling.DecodeState)


def _copies_in_loop_bodies(hlo: str) -> list[tuple[int, ...]]:
    """Shapes of the floating-point copies inside the while loops' bodies of an optimized HLO module."""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    shapes, inside = [], False
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            inside = head.group(1) in bodies
        elif inside and (copy := re.search(r"= (?:f32|bf16)\[([\d,]*)\]\S* copy\(", line)):
            shapes.append(tuple(int(d) for d in copy.group(1).split(",") if d))
    return shapes


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_writes_the_cache_in_place(tiny, batch):
    """The compiled decode loop copies no KV-cache buffer: each step writes its keys and values in
    place. Why it is tested: with [B, H, S, h] caches at batch 1, XLA:CPU dropped the size-one batch
    axis of the attention's products, duplicated every cache update for them and copied each cache
    buffer four times a step (reference size, 5 s clip: 24.2 against 18.5 ms a step with the flat
    [B * H, S, h] cache of the XLA decode attention)."""
    model = tiny()
    assert model.init_cache(batch, 40)[0].k.shape == (batch * TINY.num_heads, 40, TINY.head_dim)
    hlo = sampling.lower_generate(model, _prompts([11] * batch), _timbre(batch), max_rows=30).compile().as_text()
    cache_copies = [s for s in _copies_in_loop_bodies(hlo) if len(s) >= 3 and s[-1] == TINY.head_dim]
    assert "while" in hlo and cache_copies == []


def test_generate_with_bfloat16_parameters(tiny):
    model = tiny()
    prompts, timbre = _prompts([5, 19]), _timbre(2)
    low = sampling.generate(model, prompts, timbre, max_rows=30, dtype="bfloat16")
    high = sampling.generate(model, prompts, timbre, max_rows=30)
    assert low.num_rows.tolist() == high.num_rows.tolist() == [30, 30]
    assert ((low.codes >= 0) & (low.codes < TINY.codebook_size)).all()
    # greedy on the same weights: mostly the same tokens, not necessarily all (bf16 rounding)
    assert (low.rows == high.rows).mean() > 0.5


def test_pallas_decode_attention_generates_what_xla_does(tiny):
    """`decode_attention="pallas_gpu"` (Pallas interpret mode here): its cache rounds up to whole
    kernel blocks, and left-padded batched greedy decoding writes the XLA path's rows."""
    xla = tiny()
    pallas = nnx.merge(nnx.graphdef(TokenSynth(TINY.replace(decode_attention="pallas_gpu"), rngs=nnx.Rngs(0))),
                       nnx.state(xla))
    assert pallas.init_cache(1, 70)[0].k.shape[2] == 128
    prompts, timbre = _prompts([3, 40, 17]), _timbre(3)
    jaxpr = str(jax.make_jaxpr(lambda s: sampling.decode_loop(
        nnx.merge(nnx.graphdef(pallas), s), *map(jnp.asarray, sampling.prepare_prompts(prompts, TINY, 30)),
        jnp.asarray(timbre), jax.random.PRNGKey(0), sampler=Greedy(), max_rows=30))(nnx.state(pallas)))
    assert "pallas_call" in jaxpr
    assert_same_generation(sampling.generate(pallas, prompts, timbre, max_rows=30),
                           sampling.generate(xla, prompts, timbre, max_rows=30))


def test_matvec_as_gemm_decodes_one_item_as_two_with_the_same_results(tiny):
    """`matvec_as_gemm`: batch-1 decoding runs a batch of two (a copy done from the start, so
    every product is a two-row GEMM) and returns one item with the rows it writes without the
    copy: top-p keys, forbidden early ends and guidance included; larger batches are untouched."""
    plain = tiny(null_timbre=True)
    gemm = nnx.merge(nnx.graphdef(TokenSynth(TINY.replace(null_timbre=True, matvec_as_gemm=True), rngs=nnx.Rngs(0))),
                     nnx.state(plain))
    assert plain.cfg.replace(matvec_as_gemm=False).decodes_as_gemm is False
    prompt, timbre = _prompts([11]), _timbre(1)
    batch = lambda m, n: sampling.lower_generate(m, _prompts([11] * n), _timbre(n), max_rows=30).in_avals[0][4].shape[0]
    assert (batch(gemm, 1), batch(plain, 1), batch(gemm, 3)) == (2, 1, 3)
    for kw in ({}, {"sampler": TopP(0.9), "seed": 3, "min_frames": [12]}, {"guidance": CFG(2.0), "sampler": TopP(0.8)}):
        got = sampling.generate(gemm, prompt, timbre, max_rows=30, **kw)
        assert got.rows.shape[0] == 1 and got.codes.shape[0] == 1
        assert_same_generation(got, sampling.generate(plain, prompt, timbre, max_rows=30, **kw))


def test_decode_gemm_cublas_compiles_the_loop_without_xla_triton_gemms(tiny, monkeypatch):
    """`decode_gemm="cublas"` on a GPU compiles the decode loop with CUBLAS_GEMM_OPTIONS (shown by
    swapping in an option XLA does not know, which the compile then refuses) and writes what the
    default writes (XLA:CPU ignores the GPU option); the default compiles without it, and off a
    GPU both have the CPU's options."""
    cublas_cfg = TINY.replace(decode_gemm="cublas")
    assert sampling.decode_compile_options(cublas_cfg) == sampling.CPU_DECODE_OPTIONS  # this CPU
    monkeypatch.setattr(sampling, "on_gpu", lambda: True)
    monkeypatch.setattr(sampling, "_decode_jits", {})
    plain = tiny()
    cublas = nnx.merge(nnx.graphdef(TokenSynth(cublas_cfg, rngs=nnx.Rngs(0))), nnx.state(plain))
    assert sampling.decode_compile_options(cublas.cfg) == sampling.CUBLAS_GEMM_OPTIONS
    assert sampling.decode_compile_options(plain.cfg) == {}
    prompt, timbre = _prompts([7, 11]), _timbre(2)
    assert_same_generation(sampling.generate(cublas, prompt, timbre, max_rows=20),
                           sampling.generate(plain, prompt, timbre, max_rows=20))
    monkeypatch.setattr(sampling, "CUBLAS_GEMM_OPTIONS", {"xla_gpu_no_such_option": False})
    monkeypatch.setattr(sampling, "_decode_jits", {})
    with pytest.raises(Exception, match="No such compile option: 'xla_gpu_no_such_option'"):
        sampling.generate(cublas, prompt, timbre, max_rows=20)
    sampling.generate(plain, prompt, timbre, max_rows=20)
    with pytest.raises(ValueError, match="model.decode_gemm='cutlass': one of auto, xla, cublas, pallas"):
        TINY.replace(decode_gemm="cutlass")


def test_decode_loop_on_a_cpu_compiles_without_ynnpack_unless_xla_lacks_the_option(tiny, monkeypatch):
    """On a CPU the decode loop compiles with CPU_DECODE_OPTIONS (YNNPACK's fusions off): its
    products are XLA's dots, where the default compile has YNNPACK fusions. A jaxlib that does not
    know the option gets none, and generation still runs and writes the same rows."""
    model, prompt, timbre = tiny(), _prompts([7, 11]), _timbre(2)
    compiled = lambda: sampling.lower_generate(model, prompt, timbre, max_rows=20).compile().as_text()
    assert sampling.decode_compile_options(model.cfg) == sampling.CPU_DECODE_OPTIONS
    assert "__ynn_fusion" not in compiled()
    want = sampling.generate(model, prompt, timbre, max_rows=20, sampler=TopP(0.9))
    monkeypatch.setattr(sampling, "CPU_DECODE_OPTIONS", {"xla_cpu_no_such_option": ""})
    monkeypatch.setattr(sampling, "_decode_jits", {})
    assert sampling.decode_compile_options(model.cfg) == {}
    assert "__ynn_fusion" in compiled()
    assert_same_generation(sampling.generate(model, prompt, timbre, max_rows=20, sampler=TopP(0.9)), want)


# --- guidance -----------------------------------------------------------------------------------
def test_cfg_needs_a_null_timbre_model(tiny):
    with pytest.raises(ValueError, match="null timbre"):
        sampling.generate(tiny(), _prompts([4]), _timbre(1), guidance=CFG(2.0), max_rows=12)


def test_cfg(tiny):
    model = tiny(null_timbre=True)
    prompts, timbre = _prompts([5, 12]), _timbre(2)
    run = lambda m, guidance=None: sampling.generate(m, prompts, timbre, guidance=guidance, max_rows=30)
    plain = run(model)
    assert_same_generation(run(model, CFG(1.0)), plain)  # u + 1 * (c - u) = c
    assert not np.array_equal(run(model, CFG(3.0)).rows, plain.rows)
    # scale 0 is the null-timbre model alone: the model whose timbre MLP outputs the null embedding
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params["timbre_fc2"]["kernel"][:] = 0
    params["timbre_fc2"]["bias"][:] = params["null_embed"]
    assert_same_generation(run(model, CFG(0.0)), run(model_from_params(model.cfg, params)))


def test_first_note_guidance(tiny):
    model, uncond = tiny(), tiny(seed=2, conditioning="unconditional")
    prompts, timbre = _prompts([5, 12]), _timbre(2)
    run = lambda guidance=None, u=None: sampling.generate(
        model, prompts, timbre, guidance=guidance, unconditional_model=u, max_rows=30)
    with pytest.raises(ValueError, match="unconditional model"):
        run(FirstNoteGuidance(2.0))
    plain = run()
    assert_same_generation(run(FirstNoteGuidance(1.0), uncond), plain)  # 1 * c + 0 * u = c
    guided = run(FirstNoteGuidance(3.0, steps=4), uncond)
    for b in range(len(prompts)):
        differs = np.flatnonzero((guided.rows[b] != plain.rows[b]).any(-1))
        # the first audio row is never blended (as in the reference); rows 1..steps may be
        assert len(differs) and 1 <= differs[0] <= 4, differs


# --- the delay pattern --------------------------------------------------------------------------
def test_remove_delay_inverts_apply_delay():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 37, (11, 4))
    rows = token_layout.apply_delay(codes)
    assert rows.shape == (11 + 3, 4)
    for k in range(4):
        np.testing.assert_array_equal(rows[k : k + 11, k], codes[:, k] + 1)
        assert not rows[:k, k].any() and not rows[k + 11 :, k].any()
    np.testing.assert_array_equal(token_layout.remove_delay(rows), codes)
    batch = np.stack([rows, token_layout.apply_delay(codes[::-1])])
    np.testing.assert_array_equal(token_layout.remove_delay(batch), np.stack([codes, codes[::-1]]))
    with pytest.raises(ValueError, match="fewer than the 3"):
        token_layout.remove_delay(rows[:2])


def test_rows_to_codes_per_item():
    rng = np.random.default_rng(1)
    items = [rng.integers(0, 37, (f, 4)) for f in (6, 1, 9)]
    rows = np.zeros((3, 20, 5), np.int32)
    num_rows = np.array([len(c) + 3 for c in items] )
    for b, c in enumerate(items):
        rows[b, : num_rows[b], 1:] = token_layout.apply_delay(c)
        rows[b, num_rows[b] :, 1:] = 5  # junk after the end must be ignored
    codes, frames = sampling.rows_to_codes(rows, num_rows, 4)
    assert frames.tolist() == [6, 1, 9] and codes.shape == (3, 9, 4)
    for b, c in enumerate(items):
        np.testing.assert_array_equal(codes[b, : len(c)], c)
        assert (codes[b, len(c) :] == -1).all()
    # fewer rows than the delay needs: no frames
    codes, frames = sampling.rows_to_codes(rows[:1], np.array([2]), 4)
    assert frames.tolist() == [0] and codes.shape == (1, 0, 4)
