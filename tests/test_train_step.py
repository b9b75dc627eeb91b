"""The pure train step: it learns, accumulation is exact, decay masks, sharded == single device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensynth_jax import sharding
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.tokens import records
from tokensynth_jax.training import input_pipeline, optim
from tokensynth_jax.training import train_step as T

CFG = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=3, codebook_size=17, max_len=64, dropout=0.0)
OC = optim.OptimConfig(peak_lr=3e-3, warmup_steps=3, total_steps=100, weight_decay=0.01)
STEP = jax.jit(T.train_step, static_argnums=0, static_argnames=("null_rate", "grad_accum"))


def _batch(batch_size=4, seed=0, frames=(12, 24)):
    rng = np.random.default_rng(seed)
    examples = [
        input_pipeline.build_example(
            records.PairRecord("p", "train", "i", rng.integers(1, 1133, 4 * rng.integers(1, 4)),
                               rng.integers(0, 17, (rng.integers(*frames), 3)), np.zeros(512), {}, "", {}, {}, {}),
            CFG, 40)
        for _ in range(batch_size)
    ]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["timbre"] = rng.normal(size=(batch_size, 512)).astype(np.float32)
    return batch


def _state(cfg=CFG, model=None):
    model = model or TokenSynth(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optim.make_optimizer(OC, nnx.state(model, nnx.Param)), wrt=nnx.Param)
    return nnx.split((model, opt))


def test_loss_falls_when_overfitting_one_batch():
    graphdef, state = _state()
    batch = _batch()
    losses = []
    for i in range(40):
        state, m = STEP(graphdef, state, batch, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.3 * losses[0]
    assert float(m["positions"]) == batch["mask"].sum()


def test_gradient_accumulation_equals_the_full_batch_even_with_uneven_micro_batches():
    batch = _batch(frames=(5, 30))  # micro-batches (rows 0, 2 and 1, 3) hold different numbers of target positions
    assert batch["mask"][0::2].sum() != batch["mask"][1::2].sum()
    graphdef, state = _state()
    s1, m1 = STEP(graphdef, jax.tree.map(jnp.copy, state), batch, jax.random.PRNGKey(0), grad_accum=1)
    s2, m2 = STEP(graphdef, state, batch, jax.random.PRNGKey(0), grad_accum=2)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_weight_decay_applies_to_dense_kernels_only():
    mask = optim.decay_mask(nnx.state(TokenSynth(CFG.replace(null_timbre=True), rngs=nnx.Rngs(0)), nnx.Param))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(mask)}
    assert flat["blocks/0/mlp/fc1/kernel"] and flat["head/kernel"] and flat["blocks/1/attn/query/kernel"]
    assert not flat["blocks/0/attn/query/bias"] and not flat["midi_embed"] and not flat["pos_embed"]
    assert not flat["blocks/0/ln1/scale"] and not flat["null_embed"] and not flat["codebook_embed"]


def test_null_timbre_dropout_trains_the_null_embedding():
    cfg = CFG.replace(null_timbre=True)
    graphdef, state = _state(cfg)
    before = np.asarray(nnx.merge(graphdef, state)[0].null_embed[...])
    for i in range(2):  # warmup starts at lr 0
        state, _ = STEP(graphdef, state, _batch(), jax.random.PRNGKey(i), null_rate=1.0)
    after = np.asarray(nnx.merge(graphdef, state)[0].null_embed[...])
    assert not np.allclose(before, after)
    graphdef, state = _state(cfg)
    for i in range(2):
        state, _ = STEP(graphdef, state, _batch(), jax.random.PRNGKey(i), null_rate=0.0)
    np.testing.assert_array_equal(before, np.asarray(nnx.merge(graphdef, state)[0].null_embed[...]))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest")
def test_sharded_steps_match_one_device_and_state_is_sharded():
    batch = _batch(batch_size=8)
    graphdef, state = _state()
    losses_1 = []
    for i in range(3):
        state, m = STEP(graphdef, state, batch, jax.random.PRNGKey(i))
        losses_1.append(float(m["loss"]))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = _state()
    shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    data_sharding = sharding.batch_sharding(mesh, 2)
    sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    step = jax.jit(T.train_step, static_argnums=0, out_shardings=(shardings, None), donate_argnums=1)
    losses_8 = []
    for i in range(3):
        state, m = step(graphdef, state, sharded_batch, jax.random.PRNGKey(i))
        losses_8.append(float(m["loss"]))
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
    model, opt = nnx.merge(graphdef, state)
    assert model.blocks[0].mlp.fc1.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = jax.tree.leaves(nnx.state(opt, nnx.optimizer.OptState if hasattr(nnx.optimizer, "OptState") else nnx.Variable))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in mu if hasattr(x, "sharding"))
    assert data_sharding.spec[0] == ("data", "fsdp")


@pytest.mark.slow
def test_speed_knobs_give_the_same_steps():
    """Remat policies and unrolled layers compute the same steps; bf16 compute (weights stacked
    for the layer scan already cast) gives the unrolled bf16 step and stays near fp32."""
    batch = _batch()
    variants = [dict(), dict(remat="full"), dict(remat="dots"), dict(scan_layers=False, remat="dots"),
                dict(dtype="bfloat16"), dict(dtype="bfloat16", scan_layers=False)]
    results = []
    for changes in variants:
        graphdef, state = _state(CFG.replace(**changes))
        state, m1 = STEP(graphdef, state, batch, jax.random.PRNGKey(0))
        state, m2 = STEP(graphdef, state, batch, jax.random.PRNGKey(1))
        results.append(np.array([float(m1["grad_norm"]), float(m2["loss"])]))
    fp32, bf16, bf16_unrolled = results[0], results[4], results[5]
    for changes, result in zip(variants[1:4], results[1:4]):
        np.testing.assert_allclose(result, fp32, rtol=1e-5, err_msg=str(changes))
    np.testing.assert_allclose(bf16, bf16_unrolled, rtol=1e-2)
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2)
    assert CFG.replace(remat=True).remat == "full" and CFG.replace(remat="False").remat == "none"


def test_rbg_dropout_trains_and_repeats_exactly():
    """A train step with dropout masks from XLA's RngBitGenerator: the same step twice is the
    same bit for bit (what a resume needs), and its masks are not threefry's."""
    batch = _batch()
    results = {}
    for rng in ("threefry", "rbg", "rbg"):
        graphdef, state = _state(CFG.replace(dropout=0.2, dropout_rng=rng))
        for i in range(2):
            state, _ = STEP(graphdef, state, batch, jax.random.PRNGKey(i))
        results.setdefault(rng, []).append(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(state))))
    jax.tree.map(np.testing.assert_array_equal, *results["rbg"])
    first = jax.tree.leaves(results["rbg"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(results["threefry"][0])))
    assert all(np.isfinite(a).all() for a in first if np.issubdtype(a.dtype, np.floating))


def test_logits_gradient_in_the_compute_dtype():
    """`logits_grad_dtype="compute"`: with fp32 compute the same gradients as the default; with
    bf16 compute the head's backward products take bf16 operands only (the default widens them to
    fp32), and the gradients stay as near fp32's as the default's (chunked loss, as in training)."""
    batch = _batch()

    def grads(**changes):
        model = TokenSynth(CFG.replace(loss_chunk=16, **changes), rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)

        def loss(p):
            m = nnx.merge(nnx.graphdef(model), p)
            ce, _, count = T.head_losses(m, m.features(batch["rows"], batch["timbre"]), batch["targets"], batch["mask"])
            return ce.sum() / count

        return jax.jit(jax.grad(loss)), params

    fn, params = grads()
    exact = jax.tree.leaves(fn(params))
    for a, b in zip(jax.tree.leaves(grads(logits_grad_dtype="compute")[0](params)), exact):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    errors = {}
    for changes in ({}, {"logits_grad_dtype": "compute"}):
        fn_b, params_b = grads(dtype="bfloat16", **changes)
        widened = [e for e in _all_eqns(jax.make_jaxpr(fn_b)(params_b).jaxpr) if e.primitive.name == "dot_general"
                   and any(v.aval.shape[-1] == CFG.output_size for v in e.invars)
                   and any(v.aval.dtype == jnp.float32 for v in e.invars)]
        assert bool(widened) == (not changes), changes
        flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(fn_b(params_b))])
        want = np.concatenate([np.ravel(b) for b in exact])
        errors[bool(changes)] = float(np.linalg.norm(flat - want) / np.linalg.norm(want))
    assert errors[True] < 0.05 and errors[True] < 1.5 * errors[False] + 2e-3, errors
    with pytest.raises(ValueError, match="model.logits_grad_dtype='bf16'"):
        CFG.replace(logits_grad_dtype="bf16")


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan, checkpoint, custom_vjp)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (tuple, list)) else [value]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_chunked_head_loss_equals_the_whole_sequence_loss_and_gradient():
    """Chunks that do not divide the length (38 positions in chunks of 5, 16 and 38+)."""
    model = TokenSynth(CFG.replace(loss_chunk=0), rngs=nnx.Rngs(0))
    batch = _batch()
    features = model.features(batch["rows"], batch["timbre"])
    params = nnx.state(model, nnx.Param)

    def loss(params, chunk):
        m = nnx.merge(nnx.graphdef(TokenSynth(CFG.replace(loss_chunk=chunk), rngs=nnx.Rngs(0))), params)
        ce, hit, count = T.head_losses(m, features, batch["targets"], batch["mask"])
        return ce.sum() / count, (ce, hit, count)

    (want, (ce0, hit0, n0)), g0 = jax.value_and_grad(loss, has_aux=True)(params, 0)
    np.testing.assert_allclose(np.asarray(ce0), np.asarray(T.channel_losses(
        model(batch["rows"], batch["timbre"]), batch["targets"], batch["mask"], CFG)[0]), rtol=1e-6)
    for chunk in (5, 16, 64):
        (got, (ce, hit, n)), g = jax.value_and_grad(loss, has_aux=True)(params, chunk)
        np.testing.assert_allclose(np.asarray(ce), np.asarray(ce0), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(hit), np.asarray(hit0))
        assert float(n) == float(n0) == batch["mask"].sum()
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_chunked_loss_keeps_the_step_lean():
    """With a reference-width head (10,358 logits) the chunked loss needs far fewer temporaries."""
    cfg = CFG.replace(num_codebooks=9, codebook_size=1024, max_len=300, d_model=24, num_heads=2)
    rng = np.random.default_rng(0)
    batch = {"rows": rng.integers(0, 17, (4, 255, 10)).astype(np.int32), "timbre": np.zeros((4, 512), np.float32),
             "targets": rng.integers(0, 17, (4, 256, 10)).astype(np.int32), "mask": np.ones((4, 256), bool)}
    temps = {}
    for chunk in (0, 16):
        graphdef, state = _state(cfg.replace(loss_chunk=chunk))
        compiled = STEP.lower(graphdef, state, batch, jax.random.PRNGKey(0)).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 4 * 256 * cfg.output_size * 4  # one fp32 copy of the whole batch's logits
    # Whole, the step holds the logits and their gradient; chunked, a few chunks' worth (1/16 each).
    assert temps[0] - temps[16] > 1.5 * logits_bytes, (temps, logits_bytes)


def test_reference_config_sets_every_model_field():
    """Every ModelConfig field can be set from a config file and the command line."""
    import dataclasses
    import os

    from tokensynth_jax.config import load_config_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(root, "configs", "reference.py"), {"model.remat": "dots"})
    assert set(c.model) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig.from_dict(c.model.to_dict()).remat == "dots"
    assert ModelConfig.from_dict({**c.model.to_dict(), "remat": "none"}) == ModelConfig()  # the defaults


def test_configs_build_models_of_the_documented_sizes():
    import os

    from tokensynth_jax.config import load_config_file
    from tokensynth_jax.scaling.flops import param_counts

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sizes = {}
    for name in ("reference", "encodec", "tiny"):
        c = load_config_file(os.path.join(root, "configs", f"{name}.py"))
        cfg = ModelConfig.from_dict(c.model.to_dict())
        assert c.data.seq_len <= cfg.max_len
        sizes[name] = param_counts(cfg).total
    assert sizes["reference"] == 175_003_766  # the official model's count (test_model checks it against torch)
    assert sizes["tiny"] < 1_000_000 < sizes["encodec"]
