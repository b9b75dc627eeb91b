"""Every attention implementation gives the XLA path's numbers, forward and gradient, with left
padding: the Pallas TPU splash kernel and the Pallas GPU decode kernel in interpret mode, the
cuDNN wrapper through its XLA twin. The fused kernels lower for their platforms (jax.export from
this CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_pallas_for_cuda, randomize
from flax import nnx

from tokensynth_jax import config
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model import attention
from tokensynth_jax.model.transformer import TokenSynth

B, L, H, HD = 3, 37, 3, 16  # odd length: splash pads it to 128 positions
PAD = np.array([0, 5, L - 1])  # none, some, all but the last position
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-6), jnp.bfloat16: dict(rtol=0, atol=3e-2)}


def _qkv(dtype, length=L, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(B, length, H, HD)), dtype) for _ in range(3)]


def _xla(q, k, v, pad_b):
    return attention.causal_self_attention(q, k, v, pad_b, impl="xla")


def _check_same_forward_and_grad(fn, dtype, pad_b, length=L):
    """fn(q, k, v, pad_b) equals the XLA path; gradients of a weighted sum of every output too."""
    q, k, v = _qkv(dtype, length)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    loss = lambda f: lambda q, k, v: (f(q, k, v, pad_b).astype(jnp.float32) * w).sum()
    want, got = _xla(q, k, v, pad_b), fn(q, k, v, pad_b)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])
    if pad_b is not None:  # padding queries output zeros, in both
        assert not np.asarray(got, np.float32)[2, : L - 1].any()
    grads_want = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
    grads_got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_got, grads_want):
        scale = float(np.abs(np.asarray(b, np.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(scale, 1.0),
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_kernel_in_interpret_mode_equals_xla(dtype):
    splash = jax.jit(lambda q, k, v, p: attention.splash_attention(q, k, v, p, interpret=True))
    _check_same_forward_and_grad(splash, dtype, jnp.asarray(PAD))


@pytest.mark.parametrize("pad", [None, PAD], ids=["no_padding", "left_padding"])
def test_cudnn_wrapper_equals_xla_through_its_xla_twin(pad):
    """The rotation to right padding and the sequence lengths, run by jax's XLA implementation
    of the same call (cuDNN itself needs a GPU)."""
    twin = jax.jit(lambda q, k, v, p: attention.padded_dot_product_attention(q, k, v, p, implementation="xla"))
    _check_same_forward_and_grad(twin, jnp.float32, None if pad is None else jnp.asarray(pad))


@pytest.fixture
def cudnn_lowering(monkeypatch):
    """Lets jax lower its cuDNN attention on a machine without cuDNN: the version and compute
    capability checks are what stop it; the lowering itself is platform-independent."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not (hasattr(fused, "check_cudnn_version") and hasattr(fused, "check_compute_capability")):
        pytest.skip("this jax's cuDNN attention has other version checks")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)


def _export(fn, platform, *args):
    exported = jax.export.export(jax.jit(fn), platforms=(platform,),
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__cudnn$fmhaSoftmax"),
                                                  jax.export.DisabledSafetyCheck.custom_call("__cudnn$fmhaSoftmaxBackward")])(*args)
    return exported.mlir_module()


def test_cudnn_attention_lowers_for_cuda_forward_and_backward(cudnn_lowering):
    q = jax.ShapeDtypeStruct((2, 1024, 16, 64), jnp.bfloat16)
    pad = jax.ShapeDtypeStruct((2,), jnp.int32)
    fwd = lambda q, k, v, p: attention.padded_dot_product_attention(q, k, v, p)
    grad = jax.grad(lambda q, k, v, p: fwd(q, k, v, p).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert "__cudnn$fmhaSoftmax" in _export(fwd, "cuda", q, q, q, pad)
    assert "__cudnn$fmhaSoftmaxBackward" in _export(grad, "cuda", q, q, q, pad)


def test_splash_attention_lowers_for_tpu_forward_and_backward():
    q = jax.ShapeDtypeStruct((2, 1000, 16, 64), jnp.bfloat16)  # padded to 1024 inside
    pad = jax.ShapeDtypeStruct((2,), jnp.int32)
    fwd = lambda q, k, v, p: attention.splash_attention(q, k, v, p)
    grad = jax.grad(lambda q, k, v, p: fwd(q, k, v, p).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert _export(fwd, "tpu", q, q, q, pad).count("tpu_custom_call") == 1
    assert _export(grad, "tpu", q, q, q, pad).count("tpu_custom_call") == 3  # forward, dq, dkv


def test_auto_is_xla_on_cpu_and_explicit_names_pass_through():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto", jnp.bfloat16) == "xla"
    assert attention.resolve("pallas_tpu", jnp.float32) == "pallas_tpu"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.causal_self_attention(*_qkv(jnp.float32), impl="flash")


def test_auto_follows_the_platform_compiled_for_from_this_host():
    # What an ahead-of-time compile for other devices gets (training/plan.py, benchmarks/gpu_aot.py).
    with config.compiling_for("cuda"):
        assert attention.resolve("auto", jnp.bfloat16) == "cudnn"
        assert attention.resolve("auto", jnp.float32) == "xla"  # cuDNN's flash kernel has no fp32 path
    with config.compiling_for("rocm"):
        assert attention.resolve("auto", jnp.bfloat16) == "xla"
    with config.compiling_for("tpu"):
        assert attention.resolve("auto", jnp.float32) == "pallas_tpu"


def test_config_checks_the_attention_implementation():
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="needs dtype bfloat16"):
        ModelConfig(attention_impl="cudnn")
    assert ModelConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"


def test_model_with_the_splash_kernel_equals_xla_in_forward_and_left_padded_prefill():
    """The kernel wired into the model: the full forward (unsegmented kernel, in the layer scan)
    and a left-padded batched prefill (segment ids, cache written) give the XLA path's numbers."""
    cfg = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=3, codebook_size=17, max_len=64,
                      timbre_dim=29, timbre_hidden=31, dropout=0.0, attention_impl="xla")
    xla = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=1)
    splash = nnx.merge(nnx.graphdef(TokenSynth(cfg.replace(attention_impl="pallas_tpu"), rngs=nnx.Rngs(0))),
                       nnx.state(xla))
    rng = np.random.default_rng(2)
    rows = jnp.asarray(rng.integers(0, 17, (2, 21, 4)), jnp.int32)
    timbre = jnp.asarray(rng.normal(size=(2, 29)), jnp.float32)
    pad = jnp.asarray([0, 9], jnp.int32)

    @nnx.jit
    def run(model):
        logits = model(rows, timbre)
        last, cache = model.prefill(rows, pad, timbre, cache=model.init_cache(2, 24))
        return logits, last, cache

    for a, b in zip(jax.tree.leaves(run(splash)), jax.tree.leaves(run(xla))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest")
def test_splash_kernel_runs_per_shard_on_a_mesh():
    """XLA cannot partition a Pallas TPU kernel: under a mesh in context each device runs it on its
    items (data x fsdp) and heads (tensor), with the same numbers, forward and gradient."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tokensynth_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(4, 29, 2, 8)), jnp.float32) for _ in range(3))
    pad = jnp.asarray([0, 3, 28, 7], jnp.int32)
    place = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, place) for x in (q, k, v))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(impl):
        f = lambda q, k, v: (attention.causal_self_attention(q, k, v, pad, impl=impl) * w).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run("pallas_tpu"))(q, k, v))
        got = run("pallas_tpu")(q, k, v)
    want = run("xla")(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_the_reference_compatible_pattern_stays_on_the_xla_path():
    """attention="tokensynth-0.0.4" is no causal pattern: whatever attention_impl says, it is
    computed by `attend` with its dense mask (a causal kernel would change every position)."""
    cfg = ModelConfig(num_layers=2, d_model=48, num_heads=3, num_codebooks=3, codebook_size=17, max_len=64,
                      timbre_dim=29, timbre_hidden=31, attention="tokensynth-0.0.4", attention_impl="xla")
    xla = randomize(TokenSynth(cfg, rngs=nnx.Rngs(0)), seed=1)
    splash = nnx.merge(nnx.graphdef(TokenSynth(cfg.replace(attention_impl="pallas_tpu"), rngs=nnx.Rngs(0))),
                       nnx.state(xla))
    rows = jnp.asarray(np.random.default_rng(2).integers(0, 17, (1, 9, 4)), jnp.int32)
    timbre = jnp.ones((1, 29), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda r: splash(r, timbre))(rows))
    assert "pallas_call" not in jaxpr
    np.testing.assert_array_equal(np.asarray(splash(rows, timbre)), np.asarray(xla(rows, timbre)))


# --- decoding over a KV cache: the Pallas GPU decode kernel --------------------------------------
@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_decode_kernel_in_interpret_mode_equals_xla(dtype, split, monkeypatch):
    """One query row per item over a cache with left padding, at several slots: the first block,
    a block boundary, the last slot. Slots after `slot` hold garbage the kernel must not read.
    Both ways of running it: the cache in one-block splits (small batches), and unsplit."""
    from tokensynth_jax.model.transformer import attention_valid

    monkeypatch.setattr(attention, "PARALLEL_ITEMS", 10**9 if split else 1)

    slots = attention.cache_slots(150, "pallas_gpu")
    assert slots == 192 and attention.cache_slots(150, "xla") == 150
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(B, 1, H, HD)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(B, H, slots, HD)) * 3, dtype) for _ in range(2))
    pad = jnp.asarray([0, 5, 70], jnp.int32)
    kernel = jax.jit(lambda q, k, v, p, s: attention.pallas_decode_attention(q, k, v, p, s, interpret=True))
    for slot in (70, 127, 128, slots - 1):
        valid = attention_valid(jnp.reshape(slot, (1,)), jnp.arange(slots), pad, slot, "causal")
        want = attention.attend(q, k, v, valid)
        got = kernel(q, k, v, pad, jnp.int32(slot))
        assert got.dtype == want.dtype == dtype and got.shape == want.shape == (B, 1, H, HD)
        tol = dict(TOL[dtype], rtol=max(TOL[dtype]["rtol"], 1 / 128))  # bf16 outputs up to ~5: one ulp is 1/128
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol,
                                   err_msg=f"slot {slot}")


@pytest.mark.parametrize("batch", [1, 256])
def test_pallas_decode_kernel_lowers_for_cuda(batch):
    """From this CPU, at the reference's sizes (split at batch 1, unsplit at 256): the kernel
    lowers to one Triton call (the vmapped items and heads become its grid), so a shape the kernel
    cannot tile fails here, not on the GPU."""
    q = jax.ShapeDtypeStruct((batch, 1, 16, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, 16, attention.cache_slots(562, "pallas_gpu"), 64), jnp.bfloat16)
    pad, slot = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    fn = lambda q, k, v, p, s: attention.pallas_decode_attention(q, k, v, p, s, interpret=False)
    module, programs = lower_pallas_for_cuda(fn, q, k, k, pad, slot)
    assert module.count("@__gpu$xla.gpu.triton") == 1
    assert programs == batch * 16 * (1 if batch * 16 >= attention.PARALLEL_ITEMS else 9)  # 576 slots: 9 splits


@pytest.mark.parametrize("q_scaled", [False, True], ids=["raw queries", "prescaled queries"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_decode_step_writes_the_cache_and_attends_as_xla(dtype, q_scaled):
    """`decode_attention="pallas_fused"`'s kernel: the cache it returns is XLA's update of the
    step's keys and values at `slot`, and its output is `attend` over that cache with left padding,
    at the first block, a block boundary and the last slot; slots after `slot` hold garbage."""
    from tokensynth_jax.model.transformer import attention_valid

    slots = attention.cache_slots(150, "pallas_fused")
    assert slots == 192
    rng = np.random.default_rng(5)
    qkv = jnp.asarray(rng.normal(size=(B, 3, H, HD)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(B, H, slots, HD)) * 3, dtype) for _ in range(2))
    pad = jnp.asarray([0, 5, 70], jnp.int32)
    q = qkv[:, 0] * jnp.asarray(HD ** -0.5, dtype) if q_scaled else qkv[:, 0]
    step = jax.jit(lambda qkv, k, v, p, s: attention.pallas_decode_step(qkv, k, v, p, s, q_scaled=q_scaled,
                                                                          interpret=True))
    for slot in (70, 127, 128, slots - 1):
        y, k_out, v_out = step(qkv.at[:, 0].set(q), k, v, pad, jnp.int32(slot))
        want_k, want_v = (jax.lax.dynamic_update_slice_in_dim(c, qkv[:, i][:, :, None], slot, axis=2)
                          for i, c in ((1, k), (2, v)))
        np.testing.assert_array_equal(np.asarray(k_out), np.asarray(want_k))
        np.testing.assert_array_equal(np.asarray(v_out), np.asarray(want_v))
        valid = attention_valid(jnp.reshape(slot, (1,)), jnp.arange(slots), pad, slot, "causal")
        want = attention.attend(qkv[:, 0][:, None], want_k, want_v, valid)
        assert y.dtype == want.dtype == dtype and y.shape == want.shape == (B, 1, H, HD)
        tol = dict(TOL[dtype], rtol=max(TOL[dtype]["rtol"], 1 / 128))
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), **tol,
                                   err_msg=f"slot {slot}")


@pytest.mark.parametrize("batch", [2, 256])
def test_pallas_decode_step_lowers_for_cuda(batch):
    """From this CPU, at the reference's sizes: one Triton call of an (item, head) grid, whose cache
    outputs alias its cache inputs (the update happens in place)."""
    qkv = jax.ShapeDtypeStruct((batch, 3, 16, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, 16, attention.cache_slots(562, "pallas_fused"), 64), jnp.bfloat16)
    pad, slot = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    fn = lambda qkv, k, v, p, s: attention.pallas_decode_step(qkv, k, v, p, s, q_scaled=True, interpret=False)
    module, programs = lower_pallas_for_cuda(fn, qkv, k, k, pad, slot)
    assert module.count("@__gpu$xla.gpu.triton") == 1
    assert programs == batch * 16
    assert "output_operand_aliases" in module


def test_the_decode_kernels_run_as_themselves_when_compiling_for_cuda():
    """interpret=None follows the platform compiled for: for an H100 from this host
    (benchmarks/gpu_aot.py) both kernels were interpreted, a grid of loops."""
    qkv = jax.ShapeDtypeStruct((2, 3, 16, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 16, attention.cache_slots(562, "pallas_fused"), 64), jnp.bfloat16)
    pad, slot = jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    step = lambda qkv, k, v, p, s: attention.pallas_decode_step(qkv, k, v, p, s, q_scaled=True)
    attend = lambda qkv, k, v, p, s: attention.pallas_decode_attention(qkv[:, :1], k, v, p, s)
    with config.compiling_for("cuda"):
        for fn in (step, attend):
            assert lower_pallas_for_cuda(fn, qkv, k, k, pad, slot)[0].count("@__gpu$xla.gpu.triton") == 1


def test_config_checks_the_decode_attention():
    with pytest.raises(ValueError, match="model.decode_attention='flash'"):
        ModelConfig(decode_attention="flash")
    with pytest.raises(ValueError, match="needs model.attention='causal'"):
        ModelConfig(decode_attention="pallas_gpu", attention="tokensynth-0.0.4")
    with pytest.raises(ValueError, match="model.decode_attention='pallas_fused' needs model.attention='causal'"):
        ModelConfig(decode_attention="pallas_fused", attention="tokensynth-0.0.4")
