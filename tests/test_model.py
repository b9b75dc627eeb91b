"""The NNX model: parameter counts and logits against the reference, cached decoding (also with
the fused projections of `for_decoding`), masking, the null timbre, dropout and bf16 compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import model_from_params, randomize
from flax import nnx

from tokensynth_jax.config import REFERENCE, ConfigError, ModelConfig
from tokensynth_jax.interop import convert
from tokensynth_jax.model import layers
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.scaling.flops import param_counts

# Odd, prime-ish sizes so shape bugs show; not the reference's shapes.
TINY = ModelConfig(num_layers=3, d_model=48, num_heads=3, num_codebooks=4, codebook_size=37, max_len=97,
                   timbre_dim=29, timbre_hidden=53)
ATTENTIONS = ("causal", "tokensynth-0.0.4")
CONDITIONINGS = ("timbre", "unconditional")


def random_rows(rng, num_midi, num_audio, cfg):
    """[num_midi + 1 + num_audio, C] rows: MIDI tokens, the separator, random audio rows."""
    rows = np.zeros((num_midi + 1 + num_audio, cfg.num_channels), np.int32)
    rows[:num_midi, 0] = rng.integers(1, cfg.midi_vocab_size, num_midi)
    rows[num_midi + 1 :, 1:] = rng.integers(0, cfg.codebook_vocab_size, (num_audio, cfg.num_codebooks))
    return rows


def timbre_for(cfg, batch, seed=0):
    if cfg.conditioning == "unconditional":
        return None
    return np.random.default_rng(seed).normal(size=(batch, cfg.timbre_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    """`get(conditioning, attention, **changes)` -> a randomised TINY model, built once per key."""
    cache = {}

    def get(conditioning="timbre", attention="causal", **changes):
        key = (conditioning, attention, tuple(sorted(changes.items())))
        if key not in cache:
            cfg = TINY.replace(conditioning=conditioning, attention=attention, **changes)
            cache[key] = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=1)
        return cache[key]

    return get


# --- parameter counts ---------------------------------------------------------------------------
def _meta_reference(reference, cls):
    """A full-size reference module on the meta device: shapes without memory or init time.

    TokenSynthUnconditional calls `self.to(cpu)` itself, which a meta module cannot do; counting
    parameters needs no device, so `to` is a no-op while it is built.
    """
    with pytest.MonkeyPatch.context() as mp, torch.device("meta"):
        mp.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
        return cls(device=torch.device("meta"))


def test_reference_parameter_count(reference):
    official = _meta_reference(reference, reference.model.TokenSynth)
    assert param_counts(REFERENCE).total == sum(p.numel() for p in official.parameters())


def test_unconditional_parameter_count(reference):
    official = _meta_reference(reference, reference.model.TokenSynthUnconditional)
    used = sum(p.numel() for name, p in official.named_parameters() if not name.startswith("clap_projection."))
    assert param_counts(REFERENCE.replace(conditioning="unconditional")).total == used
    # the inherited timbre MLP is the only thing we leave out
    assert sum(p.numel() for p in official.parameters()) > used


def test_count_params_counts_what_the_model_allocates():
    model = TokenSynth(TINY.replace(null_timbre=True), rngs=nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert param_counts(TINY.replace(null_timbre=True)).total == sum(x.size for x in leaves)
    assert param_counts(TINY.replace(null_timbre=True)).total == param_counts(TINY).total + TINY.d_model


# --- logits against the reference ---------------------------------------------------------------
def _reference_logits(ref, rows, timbre):
    with torch.no_grad():
        x = torch.from_numpy(rows.astype(np.int64))
        out = ref(x) if timbre is None else ref(x, torch.from_numpy(timbre))
    return out.numpy()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_logits_match_reference(official_pair, conditioning, attention):
    ref, model = official_pair(conditioning, attention)
    rows = random_rows(np.random.default_rng(3), 23, 31, model.cfg)[None]  # the reference runs batch 1
    timbre = timbre_for(model.cfg, 1, seed=4)
    expected = _reference_logits(ref, rows, timbre)
    got = np.asarray(model(jnp.asarray(rows), timbre))
    assert got.shape == expected.shape == (1, rows.shape[1] + 1, model.cfg.output_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_attention_modes_differ(official_pair):
    """The two modes are different functions, so the parity above checks each one for real."""
    (_, causal), (_, quirk) = official_pair("timbre", "causal"), official_pair("timbre", "tokensynth-0.0.4")
    rows = random_rows(np.random.default_rng(3), 5, 6, causal.cfg)[None]
    timbre = timbre_for(causal.cfg, 1)
    assert np.abs(np.asarray(causal(rows, timbre)) - np.asarray(quirk(rows, timbre))).max() > 1.0


@pytest.mark.slow
def test_full_size_logits_match_reference(reference):
    torch.manual_seed(0)
    ref = reference.model.TokenSynth(device=torch.device("cpu")).eval()  # the reference's own init
    cfg, params, report = convert.from_official(ref.state_dict(), attention="tokensynth-0.0.4")
    assert report["mask_buffer"] == "tokensynth-0.0.4"
    assert cfg == REFERENCE.replace(attention="tokensynth-0.0.4")
    model = model_from_params(cfg, params)
    del params
    rows = random_rows(np.random.default_rng(5), 40, 60, cfg)[None]
    timbre = timbre_for(cfg, 1)
    expected = _reference_logits(ref, rows, timbre)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(rows), timbre)), expected, rtol=0, atol=1e-4)


# --- cached decoding ----------------------------------------------------------------------------
# One compile per input shape and model, instead of eager op-by-op dispatch (4x slower here).
forward = nnx.jit(lambda model, rows, timbre: model(rows, timbre))


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_cached_decoding_equals_full_forward(tiny_model, conditioning, attention, prepared):
    """Left-padded prompts of different lengths, prefilled together, then decoded row by row.

    A cached step must reproduce the last position of a full forward over the rows so far (what
    the reference computes at each step). Under causal attention that is the same position of one
    full forward over all rows; under the reference's inverted mask it is not (earlier positions
    of a longer forward see later rows), so there each prefix is run on its own. `prepared`: the
    cached steps run the model from `for_decoding` (fused QKV projections), the forward the plain one.
    """
    full = tiny_model(conditioning, attention)
    model = full.for_decoding() if prepared else full
    cfg, steps = model.cfg, 4
    rng = np.random.default_rng(11)
    num_midi = [3, 6, 0]  # prompts of 4, 7 and 1 rows (the separator included)
    items = [random_rows(rng, m, steps, cfg) for m in num_midi]
    prompt_len = np.array([m + 1 for m in num_midi])
    width = int(prompt_len.max())
    pads = width - prompt_len
    prompts = np.zeros((len(items), width, cfg.num_channels), np.int32)
    for b, rows in enumerate(items):
        prompts[b, pads[b]:] = rows[: prompt_len[b]]
    timbre = timbre_for(cfg, len(items), seed=12)

    cache = model.init_cache(len(items), width + 1 + steps)
    logits, cache = model.prefill(jnp.asarray(prompts), jnp.asarray(pads), timbre, cache=cache)
    got = [logits]
    for j in range(steps):
        row = np.stack([rows[prompt_len[b] + j] for b, rows in enumerate(items)])
        logits, cache = model.decode(jnp.asarray(row), jnp.asarray(pads), width + 1 + j, cache=cache)
        got.append(logits)
    got = np.stack([np.asarray(x) for x in got], axis=1)  # [B, steps + 1, V]

    for b, rows in enumerate(items):
        t = None if timbre is None else timbre[b : b + 1]
        n = prompt_len[b]
        if attention == "causal":
            expected = np.asarray(forward(full, rows[None], t))[0, n : n + steps + 1]
        else:
            expected = np.stack([np.asarray(forward(full, rows[None, : n + j], t))[0, -1] for j in range(steps + 1)])
        np.testing.assert_allclose(got[b], expected, rtol=1e-5, atol=1e-5, err_msg=f"item {b}")


def test_prefill_padding_does_not_leak(tiny_model):
    """An item's result does not depend on what sits in its padding slots."""
    model = tiny_model()
    cfg = model.cfg
    rows = random_rows(np.random.default_rng(2), 3, 0, cfg)
    timbre = timbre_for(cfg, 1)
    outs = []
    for fill in (0, 7):
        prompt = np.full((1, 9, cfg.num_channels), fill, np.int32)
        prompt[0, -rows.shape[0]:] = rows
        cache = model.init_cache(1, 10)
        logits, _ = model.prefill(jnp.asarray(prompt), jnp.asarray([9 - rows.shape[0]]), timbre, cache=cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[0][0], np.asarray(model(rows[None], timbre))[0, -1], rtol=1e-5, atol=1e-5)


# --- masking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_changing_a_row_changes_only_the_positions_that_see_it(tiny_model, attention):
    """Row r sits at position r + 1. Causal: positions <= r are untouched, later ones change.
    The reference's inverted mask: positions >= r + 2 are untouched, earlier ones change."""
    model = tiny_model("timbre", attention)
    rows = random_rows(np.random.default_rng(6), 7, 12, model.cfg)
    timbre = timbre_for(model.cfg, 1)
    r = 10
    changed = rows.copy()
    changed[r, 1:] = (changed[r, 1:] + 5) % model.cfg.codebook_vocab_size
    a = np.asarray(model(rows[None], timbre))[0]
    b = np.asarray(model(changed[None], timbre))[0]
    diff = np.abs(a - b).max(axis=-1)
    same, moved = (slice(0, r + 1), slice(r + 1, None)) if attention == "causal" else (slice(r + 2, None), slice(0, r + 2))
    np.testing.assert_allclose(a[same], b[same], rtol=0, atol=1e-6)
    assert (diff[moved] > 1e-3).all(), diff


# --- null timbre --------------------------------------------------------------------------------
def test_null_timbre_replaces_only_the_start_embedding(tiny_model):
    model = tiny_model(null_timbre=True)
    cfg = model.cfg
    rows = np.stack([random_rows(np.random.default_rng(s), 4, 5, cfg) for s in (0, 1)])
    timbre = timbre_for(cfg, 2)
    plain = np.asarray(model(rows, timbre))
    mixed = np.asarray(model(rows, timbre, use_null_b=jnp.array([True, False])))
    np.testing.assert_array_equal(mixed[1], plain[1])
    assert np.abs(mixed[0] - plain[0]).max() > 1e-2
    # With the null timbre the timbre is ignored ...
    other = np.asarray(model(rows, timbre[::-1] * 3.0, use_null_b=jnp.array([True, False])))
    np.testing.assert_array_equal(other[0], mixed[0])
    # ... and the result is the model whose timbre MLP outputs the null embedding.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["timbre_fc2"]["kernel"] = jnp.zeros_like(params["timbre_fc2"]["kernel"])
    params["timbre_fc2"]["bias"] = params["null_embed"]
    rewired = model_from_params(cfg, params)
    np.testing.assert_allclose(np.asarray(rewired(rows, timbre))[0], mixed[0], rtol=1e-6, atol=1e-6)


def test_null_timbre_needs_the_config_switch(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="null timbre"):
        model(np.zeros((1, 2, model.cfg.num_channels), np.int32), timbre_for(model.cfg, 1), use_null_b=jnp.array([True]))


def test_conditional_model_needs_a_timbre(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="timbre embedding"):
        model(np.zeros((1, 2, model.cfg.num_channels), np.int32))


# --- dropout ------------------------------------------------------------------------------------
def test_dropout_only_with_a_key(tiny_model):
    model = tiny_model()
    assert model.cfg.dropout > 0
    rows = random_rows(np.random.default_rng(8), 4, 6, model.cfg)[None]
    timbre = timbre_for(model.cfg, 1)
    plain = np.asarray(model(rows, timbre))
    np.testing.assert_array_equal(np.asarray(model(rows, timbre, dropout_rng=None)), plain)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    d1 = np.asarray(model(rows, timbre, dropout_rng=k1))
    assert np.abs(d1 - plain).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(model(rows, timbre, dropout_rng=k1)), d1)
    assert np.abs(np.asarray(model(rows, timbre, dropout_rng=k2)) - d1).max() > 1e-2
    # rate 0 with a key is the identity too
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    no_dropout = model_from_params(model.cfg.replace(dropout=0.0), params)
    np.testing.assert_allclose(np.asarray(no_dropout(rows, timbre, dropout_rng=k1)), plain, rtol=1e-6, atol=1e-6)


def test_rbg_dropout_draws_its_own_repeatable_masks_at_the_rate():
    x = jnp.ones((256, 512), jnp.bfloat16)
    key = jax.random.PRNGKey(5)
    rbg = layers.dropout(x, 0.25, key, "rbg")
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, k: layers.dropout(x, 0.25, k, "rbg"))(x, key)), rbg)
    assert abs(float((rbg == 0).mean()) - 0.25) < 0.01
    assert set(np.unique(np.asarray(rbg, np.float32)).tolist()) == {0.0, float(jnp.bfloat16(1 / 0.75))}
    assert not np.array_equal(rbg, layers.dropout(x, 0.25, key))  # not threefry's mask
    assert not np.array_equal(rbg, layers.dropout(x, 0.25, jax.random.PRNGKey(6), "rbg"))
    np.testing.assert_array_equal(layers.dropout(x, 0.25, None, "rbg"), x)
    with pytest.raises(ConfigError, match="model.dropout_rng='philox'"):
        ModelConfig(dropout_rng="philox")


# --- bf16 compute -------------------------------------------------------------------------------
def test_bfloat16_compute_is_close_to_float32():
    cfg = TINY.replace(dtype="bfloat16")
    model = TokenSynth(cfg, rngs=nnx.Rngs(0))  # the default init: logits of a realistic scale
    f32 = model_from_params(TINY, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert model.midi_embed[...].dtype == jnp.float32  # master weights stay fp32
    rows = random_rows(np.random.default_rng(9), 6, 10, cfg)[None]
    timbre = timbre_for(cfg, 1)
    assert model.embed_rows(jnp.asarray(rows)).dtype == jnp.bfloat16
    assert model.init_cache(1, 4)[0].k.dtype == jnp.bfloat16
    low, high = np.asarray(model(rows, timbre)), np.asarray(f32(rows, timbre))
    assert low.dtype == np.float32  # logits come back in fp32
    err = np.abs(low - high).max()
    assert 0 < err < 0.05 * np.abs(high).max(), (err, np.abs(high).max())
    # cached bf16 decoding runs and agrees with its own full forward, loosely
    cache = model.init_cache(1, rows.shape[1] + 1)
    logits, _ = model.prefill(jnp.asarray(rows), jnp.zeros(1, jnp.int32), timbre, cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[0], low[0, -1], rtol=0, atol=0.05 * np.abs(high).max())


def test_for_decoding_in_bfloat16(tiny_model):
    """bf16 inference parameters: every parameter and the cache in bf16, logits close to fp32,
    the original model (and so its checkpoint) untouched, and a prepared model left as it is."""
    model = TokenSynth(TINY, rngs=nnx.Rngs(0))  # the default init: logits of a realistic scale
    low = model.for_decoding("bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(low, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert "query" in nnx.to_pure_dict(nnx.state(model))["blocks"][0]["attn"]
    assert set(nnx.to_pure_dict(nnx.state(low))["blocks"][0]["attn"]) == {"qkv", "out"}
    assert low.for_decoding() is low and low.for_decoding("bfloat16") is low
    with pytest.raises(ValueError, match="prepared for decoding in bfloat16"):
        low.for_decoding("float32")
    rows = random_rows(np.random.default_rng(9), 6, 10, TINY)[None]
    timbre, pad = timbre_for(TINY, 1), jnp.zeros(1, jnp.int32)
    outs = []
    for m in (model, low):
        cache = m.init_cache(1, rows.shape[1] + 3)
        logits, cache = m.prefill(jnp.asarray(rows), pad, timbre, cache=cache)
        assert cache[0].k.dtype == jnp.dtype(m.cfg.dtype)
        step, _ = m.decode(jnp.asarray(rows[:, 2]), pad, rows.shape[1] + 1, cache=cache)
        outs.append(np.asarray(step))
    assert outs[1].dtype == np.float32
    err, scale = np.abs(outs[1] - outs[0]).max(), np.abs(outs[0]).max()
    assert 0 < err < 0.05 * scale, (err, scale)
