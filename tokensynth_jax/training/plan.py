"""The sharded train step compiled without running it: what each device holds, and whether it fits.

What `tokensynth compile-step` prints before a slice is reserved or a run is launched. For a Cloud TPU slice
(`topology`, e.g. "v5e:4x4") libtpu compiles the step for the slice's chips from any host, with or
without TPUs (`jax.experimental.topologies`); without a topology, for this host's devices. Nothing
is allocated: the state and the batch are ShapeDtypeStructs with their shardings. The numbers are
XLA's memory plan of the step, the Pallas TPU kernels in it (the splash attention) and its
collectives.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import time

from tokensynth_jax.errors import UserError

# High-bandwidth memory of one JAX device, GiB (Cloud TPU system architecture pages), by
# `device_kind`. Others (and v4, whose topologies list each TensorCore as a device) get no verdict.
HBM_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# What libtpu reads at start-up on a TPU VM; set so that on other hosts it starts without querying
# a metadata server or warning about their absence (it only compiles there, for the topology asked,
# whatever accelerator type this names), and so that several such processes may run at once. Its
# log files are off: each run left two in /tmp/tpu_logs, whatever TMPDIR says (errors still reach stderr).
_LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_LOG_DIR": "disabled"}
_COLLECTIVE = re.compile(r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


class PlanError(UserError):
    """A topology that libtpu cannot compile for, or a model or step that does not fit its devices."""


@dataclasses.dataclass
class Plan:
    target: str  # the topology, or "this host"
    device_kind: str
    devices: int
    mesh: dict
    global_batch: int
    seq_len: int
    grad_accum: int
    parameters: int
    argument_gb: float  # per device: parameters, optimizer state and the batch shard
    temp_gb: float
    output_gb: float
    alias_gb: float  # outputs that reuse the donated state's buffers
    hbm_gb: float | None
    pallas_tpu_kernels: int
    collectives: dict
    compile_s: float

    @property
    def total_gb(self) -> float:
        """What the step holds on a device: arguments + temporaries + outputs - aliased."""
        return self.argument_gb + self.temp_gb + self.output_gb - self.alias_gb

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_gb is None else self.total_gb <= self.hbm_gb

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_gb": self.total_gb, "fits": self.fits}

    def lines(self) -> list[str]:
        verdict = {True: "fits", False: "does NOT fit", None: "no HBM size known for this device"}[self.fits]
        of = f" of {self.hbm_gb:.1f} GB" if self.hbm_gb else ""
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        return [
            f"target: {self.target}, {self.devices} x {self.device_kind}; mesh {mesh}",
            (f"step: global batch {self.global_batch} x {self.seq_len} positions"
             + (f" in {self.grad_accum} micro-batches" if self.grad_accum > 1 else "")
             + f", {self.parameters / 1e6:.1f}M parameters"),
            (f"per device: arguments {self.argument_gb:.2f} GB (parameters, optimizer state, batch), temporaries "
             f"{self.temp_gb:.2f} GB, outputs {self.output_gb:.2f} GB ({self.alias_gb:.2f} GB reusing the donated "
             f"state): {self.total_gb:.2f} GB{of}: {verdict}"),
            (f"Pallas TPU kernels: {self.pallas_tpu_kernels}; collectives: "
             + (", ".join(f"{k} {v}" for k, v in sorted(self.collectives.items())) or "none")),
            f"compiled in {self.compile_s:.1f} s",
        ]


def prepare_environment(topology: str | None) -> None:
    """Before JAX starts a backend: for a topology, JAX's own devices are the CPU (a TPU VM's chips,
    which a run may be using, stay closed) and libtpu starts without a TPU VM's metadata."""
    if topology is None:
        return
    for key, value in _LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    import jax

    jax.config.update("jax_platforms", "cpu")


def topology_devices(topology: str) -> list:
    """The devices of a Cloud TPU topology ("v5e:2x2", "v5p:2x2x1", "v6e:4x4"), for compiling only."""
    import jax
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology {topology}: libtpu cannot compile for it: {reason}") from None


def device_memory_gb(device) -> float | None:
    """A device's memory: the table's for TPU kinds, else what the runtime reports (GPUs), if anything."""
    if device.device_kind in HBM_GIB:
        return HBM_GIB[device.device_kind] * 2**30 / 1e9
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - compile-only devices and some backends have no memory_stats
        limit = None
    return limit / 1e9 if limit else None


# What training holds of the model at least: fp32 master weights, their gradients, Adam's two moments.
TRAIN_COPIES = (4, "to train (parameters, gradients and two Adam moments)")


def check_fits_memory(cfg, copies: int, purpose: str) -> None:
    """Refuses a model (a ModelConfig) whose `copies` full sets of parameters exceed the memory of
    all the job's devices together (1 to initialise, `TRAIN_COPIES` to train): `init` of 26B
    parameters on a 25 GB host still ran after 120 s instead of failing. A lower bound, activations
    uncounted: a model it passes may still not fit (`compile_train_step` says exactly). Call it
    after `jax.distributed` is initialised."""
    import jax
    import numpy as np

    from tokensynth_jax.scaling import flops

    devices = jax.local_devices()
    if devices[0].platform == "cpu":  # however many (fake) CPU devices, they share the host's memory
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host has"
    else:
        sizes = [device_memory_gb(d) for d in devices]
        if None in sizes:
            return
        have, where = sum(sizes) * 1e9, f"its {len(devices)} {devices[0].platform.upper()} devices have"
    if jax.process_count() > 1:
        have, where = have * jax.process_count(), f"{jax.process_count()} processes like this one have"
    count = flops.param_counts(cfg).total
    need = count * np.dtype(cfg.param_dtype).itemsize * copies
    if need > have:
        raise PlanError(f"--config.model: {count / 1e9:,.1f}B parameters ({cfg.num_layers} x {cfg.d_model}) need "
                        f"{need / 1e9:,.1f} GB {purpose}; {where} {have / 1e9:,.1f} GB")


def compile_train_step(config, devices, target: str) -> Plan:
    """Compiles `config`'s train step (model, optim, mesh, data.global_batch, data.seq_len,
    train.grad_accum, train.null_rate) sharded over `devices`, allocating nothing. The model's "auto"
    choices are the devices' platform's."""
    from tokensynth_jax.config import compiling_for

    with compiling_for(devices[0].platform):  # the target's "auto" choices and kernels, not this host's
        return _compile(config, devices, target)


def _compile(config, devices, target: str) -> Plan:
    import jax
    from flax import nnx

    from tokensynth_jax import sharding
    from tokensynth_jax.config import ModelConfig
    from tokensynth_jax.model.transformer import TokenSynth
    from tokensynth_jax.scaling import flops
    from tokensynth_jax.training import optim
    from tokensynth_jax.training import train_step as ts

    cfg = ModelConfig.from_dict(config.model.to_dict())
    oc = optim.OptimConfig.from_dict(config.optim.to_dict())
    batch, seq, accum = config.data.global_batch, config.data.seq_len, config.train.grad_accum
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    sharding.check_batch(mesh, batch, accum)

    def create():
        model = TokenSynth(cfg, rngs=nnx.Rngs(0))
        return model, optim.optimizer_for(model, oc)

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    state_shardings = sharding.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                         state_shardings, abstract)
    batch_shardings = ts.batch_shardings(mesh)
    step = ts.jit_train_step(graphdef, state_shardings, batch_shardings, null_rate=config.train.null_rate,
                             grad_accum=accum)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(state, ts.abstract_batch(cfg, batch, seq, batch_shardings),
                             jax.ShapeDtypeStruct((2,), jax.numpy.uint32))
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # libtpu refuses a plan over the chip's memory
            if not str(e).startswith("RESOURCE_EXHAUSTED"):
                raise
            where = target if target == "this host" else f"--topology {target}"
            reason = str(e).removeprefix("RESOURCE_EXHAUSTED:").strip().splitlines()[0]
            raise PlanError(
                f"{where}: the train step at global batch {batch} x {seq} does not fit a {devices[0].device_kind}: "
                f"{reason.rstrip('.')}; for less memory a device: model.remat=dots or full, model.gelu_grad=recompute, "
                "a smaller data.global_batch with train.grad_accum, or more chips") from None
    compile_s = time.perf_counter() - t0
    m, hlo = compiled.memory_analysis(), compiled.as_text()
    gb = lambda n: n / 1e9
    return Plan(
        target=target, device_kind=devices[0].device_kind, devices=len(devices), mesh=dict(mesh.shape), global_batch=batch, seq_len=seq,
        grad_accum=accum, parameters=flops.param_counts(cfg).total,
        argument_gb=gb(m.argument_size_in_bytes), temp_gb=gb(m.temp_size_in_bytes), output_gb=gb(m.output_size_in_bytes),
        alias_gb=gb(m.alias_size_in_bytes),
        hbm_gb=device_memory_gb(devices[0]),
        pallas_tpu_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
        collectives=dict(collections.Counter(_COLLECTIVE.findall(hlo))), compile_s=round(compile_s, 1),
    )

