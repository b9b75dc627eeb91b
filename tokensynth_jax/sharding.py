"""Device mesh, logical-axis rules and sharded model creation.

The model names logical axes only (`embed`, `mlp`, `heads`, `vocab`, ...); the rules here map
them to the mesh axes `data`, `fsdp` and `tensor`. Parameters are created by a jitted
initialiser with `out_shardings`, so they are born sharded and never exist whole on one device.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokensynth_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (t5x-sized). Weights: FSDP over `embed`, tensor parallel over the
# MLP hidden, heads and vocabulary. Activations: batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("timbre", None),
    ("length", None),
    ("act_embed", None),
)


class MeshError(UserError):
    """A mesh shape (`config.mesh`) that the devices at hand cannot make."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `data`, `fsdp`, `tensor`; one axis may be -1 (filled with the remaining devices).

    Raises:
      MeshError (a UserError naming --config.mesh): a shape these devices cannot make.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    asked = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise MeshError(f"--config.mesh: at most one mesh axis may be -1, got {asked}")
    known = math.prod(s for s in sizes if s != -1)
    if known < 1 or any(s < -1 or s == 0 for s in sizes):
        raise MeshError(f"--config.mesh: axis sizes must be positive (or one -1), got {asked}")
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"--config.mesh: {len(devices)} devices do not divide into mesh {asked}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise MeshError(f"--config.mesh: mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def check_batch(mesh: Mesh, global_batch: int, grad_accum: int = 1) -> None:
    """Refuses a global batch that does not split over the batch's mesh axes (data x fsdp) or into
    `grad_accum` micro-batches. (Micro-batches that do not split over data x fsdp still run, with
    some devices holding copies.)

    Raises:
      MeshError naming --config.data.global_batch.
    """
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % rows:
        raise MeshError(f"--config.data.global_batch={global_batch}: not a multiple of data x fsdp ({rows})")
    if global_batch % grad_accum:
        raise MeshError(f"--config.data.global_batch={global_batch}: not a multiple of train.grad_accum ({grad_accum})")


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of one array annotated with logical axis `names` (None: replicated axis)."""
    table = dict(rules)
    if not names:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one array axis at most
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every variable of an (abstract) NNX state, from its logical names."""

    def one(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else ()
        return NamedSharding(mesh, _fitted(logical_to_spec(names, rules), shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fitted(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """`spec` with every array axis that its mesh axes do not divide (or that names an axis the
    mesh lacks) replicated rather than failing (small test models)."""
    def fits(i, s):
        axes = (s,) if isinstance(s, str) else tuple(s)
        return all(a in mesh.shape for a in axes) and shape[i] % math.prod(mesh.shape[a] for a in axes) == 0

    return PartitionSpec(*[s if s is None or fits(i, s) else None for i, s in enumerate(spec)])


# Logical axes of the activations that `constrain` pins: the residual stream [B, L, D] and a
# per-item vector [B, D], batch-major with the model dimension whole.
RESIDUAL = ("batch", "length", "act_embed")
PER_ITEM = ("batch", "act_embed")


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """x sharded as its logical axis `names` say, when a mesh is in context (`jax.set_mesh`);
    without one, x as it is.

    Why: the parameters carry shardings and the batch arrives batch-sharded, but left to itself
    SPMD propagation sharded the residual stream over `embed`, as the LayerNorm scales and the
    FSDP-sharded weights are. It then all-to-all'd whole activations between the two shardings and
    all-reduced partial products of the contractions over `embed` (a 2-layer train step on fsdp 8:
    14 all-to-alls and 33 all-reduces against 0 and 31 with the stream pinned, and 1.24 against
    0.40 GB of temporaries a device). Pinned batch-major, every weight is all-gathered before its
    product, which is FSDP.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fitted(logical_to_spec(names, rules), x.shape, mesh))


def whole_embed(table: nnx.Param, rules=DEFAULT_RULES) -> jax.Array:
    """A lookup table's value for a gather, its `embed` axis whole on every device of the mesh in
    context (`jax.set_mesh`; without one, the value as it is): FSDP's all-gather before use, as
    every weight gets.

    Why: gathered from a table sharded over `embed`, the rows come out sharded over `embed`, and
    the gradient's scatter-add needs the [B, L, D] gradient so sharded as well. SPMD cannot move it
    there from the batch sharding on a data x fsdp mesh and replicates it whole on every device
    instead ("involuntary full rematerialization": the global batch's activations on each
    device). With the table whole over `embed`, rows and gradient keep the batch sharding and the
    table's gradient is reduced over the mesh like any weight's.
    """
    names = table.get_metadata().get("out_sharding")
    if not names:
        return table[...]
    return constrain(table[...], tuple(None if n == "embed" else n for n in names), rules)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major array: batch over data x fsdp, other axes replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))
