"""The official-checkpoint converter: exact round trips, strict errors, mask buffers, and the
official classes loading what we write."""
import re

import jax
import numpy as np
import pytest
import torch
from conftest import REF_TINY, model_from_params, randomize
from flax import nnx

from tokensynth_jax import checkpoint
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.interop import convert
from tokensynth_jax.model.transformer import TokenSynth

# Official-compatible (the 1133-id MIDI vocabulary) but otherwise odd sizes.
TINY = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=4, codebook_size=37, max_len=97,
                   timbre_dim=29, timbre_hidden=53)


@pytest.fixture(scope="module")
def ours():
    """`get(conditioning)` -> (cfg, numpy params) of a randomised TINY model."""
    cache = {}

    def get(conditioning="timbre"):
        if conditioning not in cache:
            cfg = TINY.replace(conditioning=conditioning)
            model = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=2)
            cache[conditioning] = (cfg, checkpoint.params_to_numpy(model))
        return cache[conditioning]

    return get


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# --- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["causal", "tokensynth-0.0.4"])
@pytest.mark.parametrize("conditioning", ["timbre", "unconditional"])
def test_ours_to_official_and_back_is_exact(ours, conditioning, attention):
    cfg, params = ours(conditioning)
    cfg = cfg.replace(attention=attention)
    state = convert.to_official(cfg, params)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    cfg2, params2, report = convert.from_official(state, num_heads=cfg.num_heads, attention=attention)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    assert report["mask_buffer"] == attention
    assert report["dropped_buffers"] == []
    unused = report["unused_official_params"]
    if conditioning == "unconditional":
        assert sorted(unused) == sorted(k for k in state if k.startswith("clap_projection."))
        assert all(not state[k].any() for k in unused)  # written as zeros
    else:
        assert unused == []


@pytest.mark.parametrize("unconditional", [False, True])
def test_official_to_ours_and_back_is_exact(tiny_reference, unconditional):
    ref = tiny_reference(unconditional=unconditional, seed=3)
    state = ref.state_dict()
    cfg, params, report = convert.from_official(state, num_heads=REF_TINY["num_heads"], attention="tokensynth-0.0.4")
    assert report["mask_buffer"] == "tokensynth-0.0.4"
    assert sorted(report["dropped_buffers"]) == sorted(k for k in state if re.search(r"attn\.[kv]_cache$", k))
    back = convert.to_official(cfg, params)
    # Everything but the scratch k/v caches comes back bit for bit, the default mask buffers
    # included; the unconditional class's unused timbre MLP is not kept and comes back as zeros.
    assert set(back) == {k for k in state if not re.search(r"attn\.[kv]_cache$", k)}
    unused = set(report["unused_official_params"])
    assert unused == ({k for k in state if k.startswith("clap_projection.")} if unconditional else set())
    for key, value in back.items():
        assert value.dtype == state[key].dtype, key
        assert torch.equal(value, torch.zeros_like(value) if key in unused else state[key]), key


@pytest.mark.parametrize("unconditional", [False, True])
def test_official_class_loads_our_state_dict_strictly(tiny_reference, ours, unconditional):
    """Every key we write is one the official class has, with its shape; we leave out only the
    k/v cache buffers (scratch space), so strict loading succeeds once they are added back."""
    ref = tiny_reference(unconditional=unconditional, seed=4)
    ref_cfg, ref_params, _ = convert.from_official(ref.state_dict(), num_heads=REF_TINY["num_heads"])
    # Fresh weights of the official shape, from our side.
    params = checkpoint.params_to_numpy(randomize(TokenSynth(ref_cfg, rngs=nnx.Rngs(0)), seed=5))
    state = convert.to_official(ref_cfg, params)
    result = ref.load_state_dict(state, strict=False)
    caches = sorted(k for k in ref.state_dict() if re.search(r"attn\.[kv]_cache$", k))
    assert len(caches) == 2 * REF_TINY["num_blocks"]
    assert sorted(result.missing_keys) == caches
    assert result.unexpected_keys == []
    loaded = ref.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    with_caches = {**state, **{k: loaded[k] for k in caches}}
    ref.load_state_dict(with_caches, strict=True)


# --- strict errors ------------------------------------------------------------------------------
def test_errors_list_every_problem(ours):
    cfg, params = ours()
    state = convert.to_official(cfg, params)
    del state["blocks.1.ff.2.bias"], state["ln.weight"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    state["decoder.weight"] = torch.zeros(2, 2)
    state["blocks.1.attn.query.weight"] = torch.zeros(cfg.d_model, cfg.d_model + 1)
    state["fc.bias"] = torch.zeros(cfg.output_size - 1)
    with pytest.raises(convert.ConversionError) as info:
        convert.from_official(state, num_heads=cfg.num_heads)
    message = str(info.value)
    for expected in ("missing key blocks.1.ff.2.bias", "missing key ln.weight",
                     "unexpected key blocks.0.attn.extra.weight", "unexpected key decoder.weight",
                     "shape mismatch blocks.1.attn.query.weight", "shape mismatch fc.bias"):
        assert expected in message, message
    assert isinstance(info.value, ValueError)
    assert len(message.splitlines()) == 1 + 6  # the heading, then one line per problem


def test_not_a_tokensynth_state_dict():
    with pytest.raises(convert.ConversionError, match="not an official TokenSynth state dict"):
        convert.from_official({"weight": torch.zeros(2)})


# --- mask buffers -------------------------------------------------------------------------------
def _mask(kind, n=7):
    ones = torch.ones(n, n, dtype=torch.bool)
    return {"causal": torch.tril(ones), "tokensynth-0.0.4": torch.triu(ones, 1), "full": ones,
            "triu0": torch.triu(ones), "tril-1": torch.tril(ones, -1)}[kind][None, None]


@pytest.mark.parametrize("kind,expected", [
    ("causal", "causal"), ("tokensynth-0.0.4", "tokensynth-0.0.4"),
    ("full", "other"), ("triu0", "other"), ("tril-1", "other"),
])
def test_mask_kind(kind, expected):
    assert convert.mask_kind(_mask(kind)) == expected
    assert convert.mask_kind(_mask(kind).numpy()[0, 0]) == expected


@pytest.mark.parametrize("kind", ["causal", "tokensynth-0.0.4", None])
def test_mask_buffer_is_reported_and_causal_is_the_default(ours, kind):
    cfg, params = ours()
    state = {k: v for k, v in convert.to_official(cfg, params).items() if not k.endswith(".mask")}
    if kind:
        state.update({f"blocks.{i}.attn.mask": _mask(kind, cfg.max_len) for i in range(cfg.num_layers)})
    cfg2, _, report = convert.from_official(state, num_heads=cfg.num_heads)
    assert report["mask_buffer"] == (kind or "absent")
    assert cfg2.attention == "causal"  # the paper's decoder unless the caller asks otherwise
    forced, _, _ = convert.from_official(state, num_heads=cfg.num_heads, attention="tokensynth-0.0.4")
    assert forced.attention == "tokensynth-0.0.4"


@pytest.mark.parametrize("masks", [("full", "full"), ("causal", "tokensynth-0.0.4")])
def test_unknown_or_mixed_masks_are_errors(ours, masks):
    cfg, params = ours()
    state = convert.to_official(cfg, params)
    for i, kind in enumerate(masks):
        state[f"blocks.{i}.attn.mask"] = _mask(kind, cfg.max_len)
    with pytest.raises(convert.ConversionError, match="not a single known pattern"):
        convert.from_official(state, num_heads=cfg.num_heads)


# --- what the official format cannot hold -------------------------------------------------------
def test_to_official_refuses_a_null_timbre_model():
    cfg = TINY.replace(null_timbre=True)
    params = checkpoint.params_to_numpy(TokenSynth(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(convert.ConversionError, match="null timbre"):
        convert.to_official(cfg, params)


def test_to_official_refuses_another_midi_vocabulary():
    cfg = TINY.replace(midi_vocab_size=101)
    params = checkpoint.params_to_numpy(TokenSynth(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(convert.ConversionError, match="1133"):
        convert.to_official(cfg, params)


# --- files --------------------------------------------------------------------------------------
def test_official_file_round_trip(ours, tmp_path):
    cfg, params = ours()
    path = tmp_path / "model.pt"
    torch.save(convert.to_official(cfg, params), path)
    cfg2, params2, _ = convert.from_official(convert.load_official_file(path), num_heads=cfg.num_heads)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    # and the converted model computes what the original did
    rows = np.zeros((1, 5, cfg.num_channels), np.int32)
    rows[0, :3, 0] = [5, 600, 1100]
    timbre = np.ones((1, cfg.timbre_dim), np.float32)
    np.testing.assert_array_equal(np.asarray(model_from_params(cfg2, params2)(rows, timbre)),
                                  np.asarray(model_from_params(cfg, params)(rows, timbre)))


def test_bad_official_files(tmp_path):
    with pytest.raises(convert.ConversionError, match="no such file"):
        convert.load_official_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip or pickle")
    with pytest.raises(convert.ConversionError, match="junk.pt: not a readable PyTorch file"):
        convert.load_official_file(junk)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(convert.ConversionError, match="holds a Tensor, not a state dict"):
        convert.load_official_file(tensor)
