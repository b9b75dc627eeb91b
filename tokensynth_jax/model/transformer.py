"""The TokenSynth decoder (Flax NNX): token rows + a start embedding -> per-channel logits.

Shape legend for suffixes and einsums: B batch, L positions of this call, S cache slots,
C channels of a row (1 MIDI + K codebooks), K codebooks, D d_model, H heads, h head dim,
V output vocabulary (all channels' logits side by side), T timbre embedding size.

Position 0 holds the *start embedding*: the projected CLAP timbre (conditional model), a learned
start vector (unconditional model), or a learned null timbre (classifier-free guidance). Rows
follow. Three entry points share the blocks:
- `__call__`: the full forward of training and parity tests, positions 0..L.
- `prefill`: left-padded prompts of a batch written into a fresh KV cache in one pass. Item b
  starts at slot pad_b, so every item's last prompt row lands in the same slot and decoding
  writes one slot per step for the whole batch; positions are `slot - pad_b`, so each item
  computes exactly what it would alone.
- `decode`: one row per item at `slot`, attending over the cache.
The KV cache is a tuple of per-layer `KVCache`s passed in and returned, so decoding is pure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tokensynth_jax import sharding
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model import attention, layers


def attention_valid(q_slots, k_slots, pad_b, last_slot, kind: str):
    """[B, Lq, Lk] bool: which key slots each query slot may attend to.

    Keys before an item's first slot (left padding) are never valid. `last_slot` is the last
    slot written so far: the reference's inverted pattern looks forward, but never past it.
    """
    q = q_slots[:, None]
    k = k_slots[None, :]
    if kind == "causal":
        valid = k <= q
    else:  # "tokensynth-0.0.4"
        valid = (k > q) & (k <= last_slot)
    return valid[None] & (k_slots[None, None, :] >= pad_b[:, None, None])


GEMV_HEAD_PAD = 128  # the head's rows under decode_gemm="pallas": a multiple of every gemv.BLOCK_N tried


class TokenSynth(nnx.Module):
    """Decoder-only transformer over rows of MIDI and codec tokens."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        d, init = cfg.d_model, layers.KERNEL_INIT
        self.midi_embed = layers.param(rngs, init, (cfg.midi_vocab_size, d), ("vocab", "embed"), pd)
        self.codebook_embed = layers.param(
            rngs, init, (cfg.num_codebooks, cfg.codebook_vocab_size, d), (None, "vocab", "embed"), pd
        )
        self.pos_embed = layers.param(rngs, init, (cfg.max_len, d), (None, "embed"), pd)
        if cfg.conditioning == "timbre":
            self.timbre_fc1 = layers.Dense(
                (cfg.timbre_dim,), (cfg.timbre_hidden,), ("timbre", "mlp"), cfg, rngs=rngs
            )
            self.timbre_fc2 = layers.Dense((cfg.timbre_hidden,), (d,), ("mlp", "embed"), cfg, rngs=rngs)
        else:
            self.start_embed = layers.param(rngs, init, (d,), ("embed",), pd)
        if cfg.null_timbre:
            self.null_embed = layers.param(rngs, init, (d,), ("embed",), pd)
        self.blocks = nnx.List([layers.Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_ln = layers.LayerNorm(cfg, rngs=rngs)
        self.head = layers.Dense((d,), (cfg.output_size,), ("embed", "vocab"), cfg, rngs=rngs)

    # --- embeddings ---------------------------------------------------------------------------
    def embed_rows(self, rows_blc):
        """Sum of the channel embeddings of each row, [B, L, D]."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(sharding.whole_embed(self.midi_embed), rows_blc[..., 0], axis=0).astype(dtype)
        codebooks = jnp.arange(self.cfg.num_codebooks)
        x_blkd = sharding.whole_embed(self.codebook_embed)[codebooks, rows_blc[..., 1:]].astype(dtype)
        return x + x_blkd.sum(axis=-2)

    def start_embedding(self, batch: int, timbre_bt, use_null_b):
        """Position-0 embedding [B, D] for a batch of timbres (or the learned start vector)."""
        dtype = jnp.dtype(self.cfg.dtype)
        if self.cfg.conditioning == "unconditional":
            return jnp.broadcast_to(sharding.whole_embed(self.start_embed).astype(dtype), (batch, self.cfg.d_model))
        if timbre_bt is None:
            raise ValueError("a timbre-conditioned model needs a timbre embedding")
        start = self.timbre_fc2(jax.nn.relu(self.timbre_fc1(timbre_bt)))
        if use_null_b is not None:
            if not self.cfg.null_timbre:
                raise ValueError("this model has no null timbre (config.null_timbre is False)")
            start = jnp.where(use_null_b[:, None], sharding.whole_embed(self.null_embed).astype(dtype), start)
        return sharding.constrain(start, sharding.PER_ITEM)

    # --- shared trunk -------------------------------------------------------------------------
    def _trunk(self, x_bld, valid_bqk, caches=None, slot=None, dropout_rng=None, pad_b=None):
        """The blocks and the final LayerNorm: ([B, L, D] features, new caches or None).

        `valid_bqk` None means causal self-attention (see `layers.Attention`)."""
        keys = [None] * len(self.blocks)
        if dropout_rng is not None:
            dropout_rng, *keys = jax.random.split(dropout_rng, len(self.blocks) + 1)
            x_bld = layers.dropout(x_bld, self.cfg.dropout, dropout_rng, self.cfg.dropout_rng_impl)
        call = self._block_call()
        if caches is None and self.cfg.scans_layers and len(self.blocks) > 1:
            return self.final_ln(self._scan_blocks(call, x_bld, valid_bqk, keys, pad_b)), None
        new_caches = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x_bld, cache = call(block, x_bld, valid_bqk, cache, slot, keys[i], pad_b)
            new_caches.append(cache)
        return self.final_ln(x_bld), (None if caches is None else tuple(new_caches))

    def _block_call(self):
        """`Block.__call__`, rematerialised in the backward pass as `cfg.remat` says."""
        call = type(self.blocks[0]).__call__
        if self.cfg.remat == "none":
            return call
        policy = None  # "full": save only the block's inputs
        if self.cfg.remat == "dots":
            policy = jax.checkpoint_policies.save_from_both_policies(
                jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                jax.checkpoint_policies.save_only_these_names("attention"),
            )
        # Inside a scan XLA cannot merge the recomputation with the forward (CSE), so the guard
        # against it is only needed unrolled.
        return nnx.remat(call, policy=policy, prevent_cse=not self.cfg.scans_layers)

    def _scan_blocks(self, call, x_bld, valid_bqk, keys, pad_b):
        """The blocks as one `lax.scan` over their stacked parameters (full forwards: training,
        evaluation).

        Why: on a TPU the loop keeps compile time flat at depth (`ModelConfig.scans_layers`).
        Parameters stay per block (checkpoints, conversion, sharding annotations are unchanged),
        so they are stacked here, once per step (about 70 ms of a 4.1 s reference-size CPU step).
        The matmul weights are stacked already cast to the compute dtype: with bf16 compute the
        stack is the cast that mixed precision does anyway (one pass, half the bytes), and the
        blocks read bf16 directly. LayerNorm parameters stay fp32.
        """
        dtype = jnp.dtype(self.cfg.dtype)
        graphdef = nnx.graphdef(self.blocks[0])
        norms = nnx.Any(nnx.PathContains("ln1"), nnx.PathContains("ln2"))
        dense = [nnx.state(b, nnx.Not(norms)) for b in self.blocks]
        ln = [nnx.state(b, norms) for b in self.blocks]
        stack = lambda *xs: jnp.stack([x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in xs])
        stacked_dense = jax.tree.map(stack, *dense)
        stacked_ln = jax.tree.map(lambda *xs: jnp.stack(xs), *ln)
        key_stack = None if keys[0] is None else jnp.stack(keys)

        def body(x, xs):
            dense_state, ln_state, key = xs
            x, _ = call(nnx.merge(graphdef, dense_state, ln_state), x, valid_bqk, None, None, key, pad_b)
            return x, None

        x_bld, _ = jax.lax.scan(body, x_bld, (stacked_dense, stacked_ln, key_stack))
        return x_bld

    def logits(self, features_bld):
        """Output head: [..., D] features -> [..., V] fp32 logits (accumulated in fp32)."""
        return self.head(features_bld, out_dtype=jnp.float32)

    # --- entry points -------------------------------------------------------------------------
    def __call__(self, rows_blc, timbre_bt=None, *, use_null_b=None, dropout_rng=None):
        """Full forward. Returns logits [B, L + 1, V]: position p predicts the row after it.

        Args:
          rows_blc: int token rows [B, L, C] that follow the start embedding.
          timbre_bt: CLAP embeddings [B, T] (conditional models).
          use_null_b: bool [B], replace the timbre by the learned null embedding (CFG training).
          dropout_rng: a PRNG key for dropout; None is inference.
        """
        return self.logits(self.features(rows_blc, timbre_bt, use_null_b=use_null_b, dropout_rng=dropout_rng))

    def features(self, rows_blc, timbre_bt=None, *, use_null_b=None, dropout_rng=None):
        """The full forward up to the output head: [B, L + 1, D] in the compute dtype (what the
        training loss feeds to the head chunk by chunk)."""
        batch, length = rows_blc.shape[:2]
        x = jnp.concatenate(
            [self.start_embedding(batch, timbre_bt, use_null_b)[:, None], self.embed_rows(rows_blc)], axis=1
        )
        x = sharding.constrain(x + sharding.whole_embed(self.pos_embed)[: length + 1].astype(x.dtype), sharding.RESIDUAL)
        valid = None  # causal: the attention kernel builds its own pattern
        if self.cfg.attention != "causal":
            slots = jnp.arange(length + 1)
            valid = attention_valid(slots, slots, jnp.zeros((batch,), jnp.int32), length, self.cfg.attention)
        features, _ = self._trunk(x, valid, dropout_rng=dropout_rng)
        return features

    def for_decoding(self, dtype: str | None = None) -> "TokenSynth":
        """This model prepared for `prefill` and `decode`: each layer's query, key and value
        projections fused into one matmul (under `decode_gemm="pallas"` each block a `GemvBlock`
        of fused Pallas kernels), and parameters and compute in `dtype` if given.

        bfloat16 halves the weight bytes read per decoding step, which pays on GPU and TPU; on
        XLA:CPU bf16 matmuls are slower than fp32 (benchmarks/generation.py). Unchanged arrays are
        shared with this model, whose checkpoint layout is untouched. A prepared model is returned
        as it is when `dtype` asks for nothing new.
        """
        cfg = self.cfg
        casts = dtype is not None and jnp.dtype(dtype) != jnp.dtype(cfg.dtype) or (
            dtype is not None and jnp.dtype(dtype) != jnp.dtype(cfg.param_dtype))
        if isinstance(self.blocks[0], layers.GemvBlock) or isinstance(self.blocks[0].attn, layers.FusedQKVAttention):
            if casts:
                raise ValueError(f"this model was prepared for decoding in {cfg.dtype}; prepare the original for {dtype}")
            return self
        if casts:
            cfg = cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
            model = nnx.eval_shape(lambda: TokenSynth(cfg, rngs=nnx.Rngs(0)))
            nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(self, nnx.Param)))
        else:
            model = nnx.merge(*nnx.split(self))  # new modules over the same arrays
        if cfg.decode_gemm_impl == "pallas":
            model.blocks = nnx.List([layers.GemvBlock(block, cfg) for block in model.blocks])
            model.head = layers.GemvDense.of(model.head, pad_to=GEMV_HEAD_PAD)
            return model
        for block in model.blocks:
            block.attn = layers.FusedQKVAttention(block.attn, cfg)
        return model

    def init_cache(self, batch: int, num_slots: int, dtype=None):
        """An empty KV cache of at least `num_slots` slots per layer (`attention.cache_slots`):
        [B, H, S, h] for a Pallas decode attention, flat [B * H, S, h] for XLA's.

        Why flat: at batch 1 XLA drops the size-one batch axis of the attention's products, reads a
        [B, H, S, h] cache through a reshape, and XLA:CPU then duplicated each step's cache update and
        copied every cache buffer four times a step (reference size: 24.2 against 18.5 ms a step).
        With one batch axis of B * H the products read the updated cache as it is."""
        impl = self.cfg.decode_attention_impl
        num_slots = attention.cache_slots(num_slots, impl)
        shape = (batch, self.cfg.num_heads, num_slots, self.cfg.head_dim)
        if impl == "xla":
            shape = (batch * shape[1], *shape[2:])
        dtype = jnp.dtype(dtype or self.cfg.dtype)
        return tuple(
            layers.KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks
        )

    def prefill(self, rows_bpc, pad_b, timbre_bt=None, *, cache, use_null_b=None):
        """Writes left-padded prompts into `cache`; returns the last slot's logits [B, V] and the cache.

        Args:
          rows_bpc: prompt rows [B, P, C], item b's rows right-aligned (slots pad_b + 1 .. P).
          pad_b: int [B], slots before item b's start embedding (its left padding).
          timbre_bt: CLAP embeddings [B, T] for conditional models.
          cache: from `init_cache`, with at least P + 1 slots.
        """
        num_rows = rows_bpc.shape[1]
        slots = jnp.arange(num_rows + 1)
        start = self.start_embedding(rows_bpc.shape[0], timbre_bt, use_null_b)
        x = jnp.concatenate([jnp.zeros_like(start)[:, None], self.embed_rows(rows_bpc)], axis=1)
        x = jnp.where((slots[None, :] == pad_b[:, None])[..., None], start[:, None], x)
        positions = jnp.clip(slots[None, :] - pad_b[:, None], 0, self.cfg.max_len - 1)
        x = x + jnp.take(sharding.whole_embed(self.pos_embed), positions, axis=0).astype(x.dtype)
        valid = None  # causal: over the prompt's own keys, left padding from pad_b
        if self.cfg.attention != "causal":
            valid = attention_valid(slots, jnp.arange(cache[0].k.shape[-2]), pad_b, num_rows, self.cfg.attention)
        features, cache = self._trunk(x, valid, cache, 0, pad_b=pad_b)
        return self.logits(features[:, -1]), cache

    def decode(self, row_bc, pad_b, slot, *, cache):
        """One row per item written at `slot`; returns its logits [B, V] and the cache."""
        x = self.embed_rows(row_bc[:, None])
        positions = jnp.clip(slot - pad_b, 0, self.cfg.max_len - 1)
        x = x + jnp.take(sharding.whole_embed(self.pos_embed), positions, axis=0)[:, None].astype(x.dtype)
        valid = attention_valid(
            jnp.reshape(slot, (1,)), jnp.arange(cache[0].k.shape[-2]), pad_b, slot, self.cfg.attention
        )
        features, cache = self._trunk(x, valid, cache, slot, pad_b=pad_b)
        return self.logits(features[:, 0]), cache


def abstract_model(cfg: ModelConfig, seed: int = 0) -> TokenSynth:
    """The model with shapes and dtypes but no memory (`nnx.eval_shape` of the initialiser).

    What restore targets, shardings, exports, tensor lists and parameter counts are read from.
    """
    return nnx.eval_shape(lambda: TokenSynth(cfg, rngs=nnx.Rngs(seed)))


def create_sharded(cfg: ModelConfig, mesh, seed: int = 0, rules=sharding.DEFAULT_RULES) -> TokenSynth:
    """A freshly initialised model whose parameters are born sharded on `mesh`."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, seed))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.state(TokenSynth(cfg, rngs=nnx.Rngs(seed)))

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
