"""The Pallas few-row product kernel of decoding (model/gemv.py, Pallas interpret mode here) and
`decode_gemm="pallas"`: the kernel against its XLA form, and decoding with it against the default."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_pallas_for_cuda, randomize
from flax import nnx

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.inference import sampling
from tokensynth_jax.model import gemv, layers
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.tokens import token_layout

# Power-of-two widths, so every product of a decoding step takes the kernel.
SMALL = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_codebooks=4, codebook_size=37, max_len=97,
                    timbre_dim=29, timbre_hidden=53)


def _operands(rows, n, k, dtype, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *shape, scale=1.0: jnp.asarray(scale * r.standard_normal(shape), dtype)
    ln_scale, ln_bias = (jnp.asarray(c + 0.1 * r.standard_normal(k), jnp.float32) for c in (1.0, 0.0))
    ln = (ln_scale, ln_bias, 1e-5)
    return f(rows, k), f(n, k, scale=0.05), f(n, scale=0.1), ln, f(rows, n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,n,k,variant", [(1, 32, 512, None), (2, 64, 1024, None), (8, 16, 2048, None),
                                              (2, 64, 1024, "SUM_ONCE"), (4, 32, 1024, "ROWS_LOOP"),
                                              (2, 32, 256, "W_FIRST"), (2, 32, 256, "ROWS_LOOP+W_FIRST")])
@pytest.mark.parametrize("stage", ["product", "layer norm", "gelu", "residual", "all"])
def test_gemv_equals_its_xla_form(rows, n, k, variant, dtype, stage, monkeypatch):
    """Each form of the kernel (the tiling constants' variants) against the XLA form; K in several
    steps, except for W_FIRST, which applies to one step only."""
    monkeypatch.setattr(gemv, "BLOCK_K", 256)
    for name in (variant or "").split("+"):
        if name:
            monkeypatch.setattr(gemv, name, True)
    x, w, b, ln, res = _operands(rows, n, k, dtype)
    kw = {"product": {}, "layer norm": {"ln": ln}, "gelu": {"gelu": True}, "residual": {"residual_mn": res},
          "all": {"ln": ln, "gelu": True, "residual_mn": res}}[stage]
    got, want = gemv.gemv(x, w, b, **kw), gemv.gemv_reference(x, w, b, **kw)
    assert got.dtype == want.dtype == dtype and got.shape == (rows, n)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of the same fp32 value, or its neighbour
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("variant", [None, "SUM_ONCE", "ROWS_LOOP", "W_FIRST"])
def test_gemv_lowers_for_cuda(variant, monkeypatch):
    """From this CPU, at the reference's sizes (batch 1 as two rows; QKV with its LayerNorm, the MLP
    input with its GELU, the MLP output with its residual): every form of the kernel lowers to one
    Triton call of N / BLOCK_N programs, so a construct the Triton lowering lacks fails here."""
    if variant:
        monkeypatch.setattr(gemv, variant, True)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    for n, k, kw in ((3072, 1024, {"ln": True}), (4096, 1024, {"ln": True, "gelu": True}), (1024, 4096, {"res": True})):
        def fn(x, w, b, scale, bias, residual, kw=kw):
            ln = (scale, bias, 1e-5) if kw.get("ln") else None
            return gemv.gemv(x, w, b, ln=ln, gelu=kw.get("gelu", False), residual_mn=residual if kw.get("res") else None,
                             interpret=False)

        module, programs = lower_pallas_for_cuda(fn, spec(2, k), spec(n, k), spec(n), spec(k), spec(k), spec(2, n))
        assert module.count("@__gpu$xla.gpu.triton") == 1
        assert programs == n // gemv.BLOCK_N


@pytest.mark.parametrize("target, kernels", [("cuda", 1), ("gpu", 1), ("cpu", 0)])
def test_the_kernel_runs_as_itself_for_a_gpu_target_and_interpreted_elsewhere(target, kernels):
    """interpret=None follows the platform the model computes for: a compile for an H100 from this
    host (`compiling_for("cuda")`, benchmarks/gpu_aot.py) interpreted the kernel, a grid of loops."""
    from tokensynth_jax import config

    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    with config.compiling_for(target):
        module, _ = lower_pallas_for_cuda(lambda x, w, b: gemv.gemv(x, w, b), spec(2, 1024), spec(64, 1024), spec(64))
    assert module.count("@__gpu$xla.gpu.triton") == kernels


def test_gemv_refuses_sizes_it_cannot_tile():
    assert gemv.supported(2, 64, 1024) and not gemv.supported(3, 64, 1024) and not gemv.supported(16, 64, 1024)
    assert not gemv.supported(2, 62, 1024) and not gemv.supported(2, 64, 48)
    x, w, b, _, _ = _operands(3, 64, 1024, jnp.float32)
    with pytest.raises(ValueError, match="unsupported sizes M=3"):
        gemv.gemv(x, w, b)


def test_gelu_in_kernel_is_within_fp32_rounding_of_erf():
    x = jnp.linspace(-10.0, 10.0, 200_001)
    err = jnp.abs(gemv.gelu_in_kernel(x) - jax.nn.gelu(x, approximate=False))
    assert float(err.max()) < 1e-6
    assert float((err / jnp.maximum(jnp.abs(x), 1.0)).max()) < 3e-7  # A&S: 1.5e-7 in erf, halved, + rounding


@pytest.fixture(scope="module")
def small():
    return randomize(TokenSynth(SMALL, rngs=nnx.Rngs(0)), seed=3, std=0.2)


def _pallas_twin(model, dtype=None, **changes):
    cfg = model.cfg.replace(**{"decode_gemm": "pallas", **changes})
    twin = nnx.merge(nnx.graphdef(TokenSynth(cfg, rngs=nnx.Rngs(0))), nnx.state(model))
    return twin.for_decoding(dtype)


def test_for_decoding_builds_gemv_blocks_over_transposed_weights(small):
    prepared = _pallas_twin(small)
    block, original = prepared.blocks[0], small.blocks[0]
    assert isinstance(block, layers.GemvBlock) and prepared.for_decoding() is prepared
    np.testing.assert_array_equal(block.qkv.kernel_t[...][64:128], original.attn.key.kernel[...].reshape(64, 64).T)
    # head_dim 16: the queries' 1/4 folded into their weights (exact); not for 32, whose 32^-0.5 is not a power of 2
    assert block.q_prescaled
    np.testing.assert_array_equal(block.qkv.kernel_t[...][:64], original.attn.query.kernel[...].reshape(64, 64).T / 4)
    np.testing.assert_array_equal(block.qkv.bias[...][:64], original.attn.query.bias[...].reshape(64) / 4)
    wide_heads = TokenSynth(SMALL.replace(num_heads=2, decode_gemm="pallas"), rngs=nnx.Rngs(0)).for_decoding()
    assert not wide_heads.blocks[0].q_prescaled
    np.testing.assert_array_equal(block.fc2.kernel_t[...], original.mlp.fc2.kernel[...].T)
    head = prepared.head.kernel_t[...]  # zero rows up to a multiple of the kernel's tiles
    assert head.shape[0] % 128 == 0 and head.shape[0] - SMALL.output_size < 128 and not head[SMALL.output_size:].any()
    with pytest.raises(ValueError, match="prepared for decoding"):
        prepared.for_decoding("bfloat16")


@pytest.mark.parametrize("decode_attention,kernels_a_layer", [("xla", 4), ("pallas_fused", 5)])
def test_decode_step_logits_equal_the_default_path(small, decode_attention, kernels_a_layer):
    """One prefill and three decoding steps of two items (batch 1 decodes as two): the same logits and
    cache as the fused-QKV XLA path (fp32 here: only the summation order differs); with the fused
    decode-step attention, one Pallas kernel more a layer and no cache update outside it."""
    batch = 2
    plain, pallas = small.for_decoding(), _pallas_twin(small, decode_attention=decode_attention)
    rng = np.random.default_rng(batch)
    prompt = jnp.asarray(rng.integers(0, 37, (batch, 5, SMALL.num_channels)), jnp.int32)
    pad = jnp.asarray(rng.integers(0, 3, batch), jnp.int32)
    timbre = jnp.asarray(rng.standard_normal((batch, SMALL.timbre_dim)), jnp.float32)
    outs = []
    for model in (plain, pallas):
        logits, cache = model.prefill(prompt, pad, timbre, cache=model.init_cache(batch, 9))
        steps = [logits]
        for s in range(3):
            logits, cache = model.decode(prompt[:, s], pad, 6 + s, cache=cache)
            steps.append(logits)
        outs.append((np.stack(steps), cache))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(outs[1][1]), jax.tree.leaves(outs[0][1])):  # a Pallas cache has whole blocks
        a, b = (x.reshape(batch, -1, *x.shape[-2:]) for x in (a, b))  # an XLA cache is flat, [B * H, S, h]
        np.testing.assert_allclose(a[:, :, : b.shape[2]], b, rtol=1e-4, atol=1e-4)
    step = jax.make_jaxpr(lambda c: pallas.decode(prompt[:, 0], pad, 6, cache=c))(outs[1][1])
    # a layer: LN + QKV, [attention + cache write,] out + residual, LN + fc1 + GELU, fc2 + residual; the head
    assert str(step).count("pallas_call") == kernels_a_layer * SMALL.num_layers + 1
    assert ("dynamic_update_slice" in str(step)) == (decode_attention == "xla")


@pytest.mark.parametrize("decode_gemm,decode_attention", [("pallas", "xla"), ("pallas", "pallas_gpu"),
                                                          ("pallas", "pallas_fused"), ("xla", "pallas_fused")])
def test_generation_with_the_pallas_products_writes_the_default_rows(small, decode_gemm, decode_attention):
    """Greedy, left-padded batched generation, and top-p with a seed: the rows of the default path,
    with the Pallas products and any decode attention (the Pallas kernels take the prescaled queries
    as they are), and with XLA's products and the fused decode-step attention (raw queries)."""
    prompts = [np.random.default_rng(i).integers(1, token_layout.MIDI_VOCAB_SIZE, n).astype(np.int32)
               for i, n in enumerate([5, 21, 13, 8])]
    timbre = np.random.default_rng(0).normal(size=(4, SMALL.timbre_dim)).astype(np.float32)
    pallas = _pallas_twin(small, decode_gemm=decode_gemm, decode_attention=decode_attention)
    for n, kw in ((4, {}), (1, {"sampler": sampling.TopP(0.9), "seed": 4})):
        a = sampling.generate(pallas, prompts[:n], timbre[:n], max_rows=16, **kw)
        b = sampling.generate(small, prompts[:n], timbre[:n], max_rows=16, **kw)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.num_rows, b.num_rows)
