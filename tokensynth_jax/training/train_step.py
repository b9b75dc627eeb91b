"""The loss and the pure, jittable train and eval steps.

`train_step(graphdef, state, batch, step_rng)` is one module-level pure function over the whole
train state (model parameters + optimizer state as one NNX state), so `jax.jit` with explicit
shardings and donation applies to it directly. Gradient accumulation scans over micro-batches
and sums gradients in fp32. Timbre dropout swaps the timbre for the learned null embedding with
probability `null_rate`, which is what classifier-free guidance needs at sampling time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tokensynth_jax import sharding
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import TokenSynth

# A batch's arrays and their ranks (input_pipeline.build_example): each is sharded over its first axis.
BATCH_NDIMS = {"timbre": 2, "rows": 3, "targets": 3, "mask": 2}


def channel_losses(logits_blv, targets_blc, mask_bl, cfg: ModelConfig):
    """Cross-entropy and accuracy per channel over the masked positions.

    Returns:
      (ce_c, acc_c, count): summed cross-entropy [C] and correct predictions [C] over the
      masked positions, and the number of masked positions.
    """
    vm = cfg.midi_vocab_size
    batch, length = targets_blc.shape[:2]
    midi = logits_blv[..., :vm]
    books = logits_blv[..., vm:].reshape(batch, length, cfg.num_codebooks, cfg.codebook_vocab_size)
    ce_midi = optax.softmax_cross_entropy_with_integer_labels(midi, targets_blc[..., 0])
    ce_books = optax.softmax_cross_entropy_with_integer_labels(books, targets_blc[..., 1:])
    ce = jnp.concatenate([ce_midi[..., None], ce_books], -1)
    hit = jnp.concatenate([(midi.argmax(-1) == targets_blc[..., 0])[..., None], books.argmax(-1) == targets_blc[..., 1:]], -1)
    m = mask_bl[..., None].astype(jnp.float32)
    return (ce * m).sum((0, 1)), (hit * m).sum((0, 1)), mask_bl.sum().astype(jnp.float32)


def head_losses(model: TokenSynth, features_bld, targets_blc, mask_bl):
    """`channel_losses` of the output head over `features`, `cfg.loss_chunk_size` positions at a time.

    The head is 10,358 logits wide at the reference size: fp32 logits of a whole batch (and their
    gradient, and softmax temporaries) would be the step's largest tensors. Here a `lax.scan`
    over position chunks computes each chunk's logits, losses and hits, and `jax.checkpoint`
    makes the backward recompute a chunk's logits rather than keep them: the head costs one more
    matmul, and no more than one chunk of logits is alive at a time.
    """
    cfg = model.cfg
    batch, length = targets_blc.shape[:2]
    chunk = cfg.loss_chunk_size
    if chunk == 0 or chunk >= length:
        return channel_losses(model.logits(features_bld), targets_blc, mask_bl, cfg)
    num = -(-length // chunk)
    pad = num * chunk - length  # padded positions are masked out

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, num, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(f_bcd, t_bcc, m_bc):
        ce, hit, _ = channel_losses(model.logits(f_bcd), t_bcc, m_bc, cfg)
        return ce, hit

    def body(acc, xs):
        ce, hit = one(*xs)
        return (acc[0] + ce, acc[1] + hit), None

    zeros = jnp.zeros((cfg.num_channels,), jnp.float32)
    (ce, hit), _ = jax.lax.scan(body, (zeros, zeros), (chunks(features_bld), chunks(targets_blc), chunks(mask_bl)))
    return ce, hit, mask_bl.sum().astype(jnp.float32)


def _forward_losses(model: TokenSynth, batch, rng, null_rate: float, train: bool):
    use_null = None
    if model.cfg.null_timbre:
        null_key, rng = jax.random.split(rng)
        use_null = jax.random.bernoulli(null_key, null_rate, (batch["timbre"].shape[0],)) if train else None
    features = model.features(batch["rows"], batch["timbre"], use_null_b=use_null, dropout_rng=rng if train else None)
    return head_losses(model, features, batch["targets"], batch["mask"])


def _loss(model, batch, rng, null_rate, norm):
    """Summed cross-entropy / norm: `norm` counts the whole batch's predictions (positions x
    channels), so micro-batch losses and gradients add up to exactly the full batch's mean."""
    ce, hit, count = _forward_losses(model, batch, rng, null_rate, True)
    return ce.sum() / norm, (ce, hit, count)


def train_step(graphdef, state, batch, step_rng, *, null_rate: float = 0.0, grad_accum: int = 1):
    """One optimizer step. Returns the new state and metrics (sums, so hosts can average)."""
    model, optimizer = nnx.merge(graphdef, state)
    params = nnx.state(model, nnx.Param)
    norm = jnp.maximum(batch["mask"].sum() * model.cfg.num_channels, 1).astype(jnp.float32)

    def grads_of(micro, rng):
        def loss_of(p):
            m = nnx.merge(nnx.graphdef(model), p, nnx.state(model, nnx.Not(nnx.Param)))
            return _loss(m, micro, rng, null_rate, norm)

        return jax.value_and_grad(loss_of, has_aux=True)(params)

    if grad_accum == 1:
        (loss, (ce, hit, count)), grads = grads_of(batch, step_rng)
    else:
        # Micro-batch i is rows i, i + grad_accum, ...: each device's rows split among the
        # micro-batches where they lie, so every micro-batch keeps the batch's sharding. (Taking
        # consecutive rows put each micro-batch on a fraction of the devices and made SPMD
        # all-to-all the batch into place.)
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(acc, xs):
            i, mb = xs
            (l, aux), g = grads_of(mb, jax.random.fold_in(step_rng, i))
            acc_g, acc_l, acc_aux = acc
            acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
            return (acc_g, acc_l + l, jax.tree.map(jnp.add, acc_aux, aux)), None

        init_aux = (jnp.zeros(model.cfg.num_channels), jnp.zeros(model.cfg.num_channels), jnp.zeros(()))
        (grads, loss, (ce, hit, count)), _ = jax.lax.scan(body, (zeros, 0.0, init_aux), (jnp.arange(grad_accum), micro))
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    # Examples with no targets are records the input pipeline could not use (`skipped_example`);
    # counted here, over the global batch, so a run of several processes reports them all.
    skipped = (~batch["mask"].any(-1)).sum()
    metrics = {"loss": loss, "grad_norm": grad_norm, "ce_sum": ce, "correct": hit, "positions": count,
               "skipped_examples": skipped}
    return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, state, batch):
    """Summed per-channel cross-entropy and accuracy of a batch, without dropout."""
    model, _ = nnx.merge(graphdef, state)
    ce, hit, count = _forward_losses(model, batch, jax.random.PRNGKey(0), 0.0, False)
    return {"ce_sum": ce, "correct": hit, "positions": count}


def batch_shardings(mesh) -> dict:
    """The NamedSharding of each batch array: batch over data x fsdp."""
    return {k: sharding.batch_sharding(mesh, n) for k, n in BATCH_NDIMS.items()}


def abstract_batch(cfg: ModelConfig, global_batch: int, seq_len: int, shardings: dict) -> dict:
    """ShapeDtypeStructs of a global batch, as `input_pipeline` makes it (for compiling without data)."""
    shapes = {"timbre": ((global_batch, cfg.timbre_dim), jnp.float32),
              "rows": ((global_batch, seq_len - 1, cfg.num_channels), jnp.int32),
              "targets": ((global_batch, seq_len, cfg.num_channels), jnp.int32),
              "mask": ((global_batch, seq_len), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k]) for k, (shape, dtype) in shapes.items()}


def jit_train_step(graphdef, state_shardings, in_batch_shardings: dict, *, null_rate: float, grad_accum: int):
    """`train_step` jitted with explicit shardings, the state donated. Lower it with the mesh in
    context (`jax.set_mesh`): the Pallas TPU attention is shard_mapped over it."""
    return jax.jit(functools.partial(train_step, graphdef, null_rate=null_rate, grad_accum=grad_accum),
                   in_shardings=(state_shardings, in_batch_shardings, None), out_shardings=(state_shardings, None),
                   donate_argnums=0)
