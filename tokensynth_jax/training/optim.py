"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay masks.

Weight decay applies to the dense layers' kernels only; biases, LayerNorm parameters, embeddings,
positions and the start/null vectors are left undecayed (the usual GPT-style split). Every dense
weight in layers.py is named `kernel`, so the mask is that name and needs no list to maintain.
"""
from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (from `config.optim`)."""

    peak_lr: float = 3e-4  # after warmup
    end_lr_ratio: float = 0.1  # cosine decays to peak_lr * end_lr_ratio
    warmup_steps: int = 1000
    total_steps: int = 100_000  # schedule length (the run's steps)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables

    @classmethod
    def from_dict(cls, values) -> "OptimConfig":
        return cls(**dict(values))


def schedule(oc: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=oc.peak_lr, warmup_steps=max(oc.warmup_steps, 1),
        decay_steps=max(oc.total_steps, oc.warmup_steps + 1), end_value=oc.peak_lr * oc.end_lr_ratio,
    )


def decay_mask(params: nnx.State):
    """True for the parameters that get weight decay: the dense layers' kernels."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def optimizer_for(model: nnx.Module, oc: OptimConfig) -> nnx.Optimizer:
    """`make_optimizer(oc)` over `model`'s parameters: the optimizer half of the train state."""
    return nnx.Optimizer(model, make_optimizer(oc, nnx.state(model, nnx.Param)), wrt=nnx.Param)


def make_optimizer(oc: OptimConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW(schedule) with clipping; decay mask computed from `params`' logical names."""
    chain = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm else []
    chain.append(
        optax.adamw(schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                    mask=decay_mask(params))
    )
    return optax.chain(*chain)
