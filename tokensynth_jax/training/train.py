"""`tokensynth train`: the sharded training loop, read top to bottom.

distributed init -> mesh -> data -> abstract state and its shardings -> sharded model and
optimizer -> restore (or --init-from) -> jit(train_step) with explicit shardings and donation ->
ahead-of-time compile, log memory_analysis -> the loop (metrics, eval, checkpoints, SIGTERM) ->
wait for async saves. The same code runs on one CPU, a GPU, or a TPU pod slice.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time

import jax
import numpy as np
from flax import nnx

from tokensynth_jax import checkpoint, sharding, tensorboard_media
from tokensynth_jax.config import ModelConfig
from tokensynth_jax.errors import UserError
from tokensynth_jax.model.transformer import TokenSynth
from tokensynth_jax.scaling.flops import model_flops_per_token
from tokensynth_jax.training import input_pipeline, optim, plan, train_samples
from tokensynth_jax.training import train_step as ts

log = logging.getLogger("tokensynth.train")


def truncate_metrics(path: str, step: int) -> int:
    """Keeps the lines of a metrics.jsonl up to `step` (the step a run resumes from); returns how
    many were dropped. A run killed after its last checkpoint wrote lines for steps it will
    train again; a half-written last line (killed mid-write) goes too. Rewritten atomically."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)


class MetricsWriter:
    """Metrics to a JSON-lines file and TensorBoard (process 0 only); one line on the console.
    Sample clips go to TensorBoard as audio and spectrogram images (`tensorboard_media`).

    `start` is the step the run resumes from: what was written after it is dropped (the JSON
    lines) or hidden (TensorBoard's purge_step), so every step appears once.
    """

    def __init__(self, workdir: str, start: int = 0):
        self.active = jax.process_index() == 0
        self.jsonl, self.tb = None, None
        if self.active:
            path = os.path.join(workdir, "metrics.jsonl")
            dropped = truncate_metrics(path, start)
            if dropped:
                log.info("metrics.jsonl: dropped %d lines after step %d, which this run writes again", dropped, start)
            self.jsonl = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start + 1)
            except ImportError:
                log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        head = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith(("ce_", "acc_")))
        print(f"[{prefix}] step {step}: {head}", flush=True)

    def write_clips(self, step: int, clips: list, prefix: str = "samples"):
        """(tag, audio, sample rate) clips as TensorBoard audio and spectrogram images."""
        if self.tb:
            for tag, audio, rate in clips:
                tensorboard_media.add_clip(self.tb, f"{prefix}/{tag}", audio, rate, step)
            self.tb.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Diverged(UserError):
    """The loss or the gradient norm stopped being finite: the run's settings, not a bug; one line."""


def summarize(sums: dict, cfg: ModelConfig) -> dict:
    """Host-side metrics from the step's sums: mean loss, per-channel loss and accuracy."""
    positions = max(float(sums["positions"]), 1.0)
    ce, hit = np.asarray(sums["ce_sum"]) / positions, np.asarray(sums["correct"]) / positions
    names = ["midi"] + [f"cb{k}" for k in range(cfg.num_codebooks)]
    out = {"ce": float(ce.mean()), "accuracy": float(hit.mean())}
    out.update({f"ce_{n}": float(v) for n, v in zip(names, ce)})
    out.update({f"acc_{n}": float(v) for n, v in zip(names, hit)})
    return out


# Dense bf16 peak FLOP/s per device from the datasheets, by `device_kind` substring. MFU is
# reported only where the peak is known (or set with train.peak_flops_per_device).
PEAK_BF16_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
                   "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(config) -> float | None:
    """Peak FLOP/s of all devices of the run, or None where unknown (CPUs)."""
    per_device = config.train.get("peak_flops_per_device", 0.0)
    if not per_device:
        kind = jax.devices()[0].device_kind
        per_device = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    return per_device * jax.device_count() if per_device else None


def to_global(local: dict, batch_shardings: dict) -> dict:
    """This process's batch -> global arrays sharded over the mesh (every process calls it)."""
    return {k: jax.make_array_from_process_local_data(batch_shardings[k], v) for k, v in local.items()}


def _install_stop_handlers():
    """Preemption (SIGTERM) and a first Ctrl-C (SIGINT) ask the loop to save and stop at the next
    step, so an interrupted run loses nothing; a second Ctrl-C stops at once (KeyboardInterrupt).
    Returns (flag: {"stop": the signal's name or None}, restore: puts the previous handlers back)."""
    flag = {"stop": None}
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again stops at once)")

    for s in previous:
        signal.signal(s, handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return flag, restore


def initialize_distributed():
    """Joins the processes of a multi-process run before any device is touched.

    TOKENSYNTH_COORDINATOR=host:port with TOKENSYNTH_NUM_PROCESSES and TOKENSYNTH_PROCESS_ID
    name the job explicitly (several processes on one machine, or any cluster);
    TOKENSYNTH_DISTRIBUTED=auto lets JAX read the platform (TPU VM pods, SLURM), which is what
    the launch/ scripts set. Neither: one process, nothing to do.
    """
    coordinator = os.environ.get("TOKENSYNTH_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
        jax.distributed.initialize(coordinator, int(os.environ["TOKENSYNTH_NUM_PROCESSES"]),
                                   int(os.environ["TOKENSYNTH_PROCESS_ID"]))
    elif os.environ.get("TOKENSYNTH_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def train(config, workdir: str, init_from: str | None = None) -> dict:
    """Trains `config` (a ConfigDict with model, data, optim, train, mesh) in `workdir`.

    Resumes from the newest checkpoint in `workdir` automatically; `init_from` loads the
    parameters of a model checkpoint (e.g. a converted official one) when starting fresh.
    Returns the last logged metrics.
    """
    initialize_distributed()
    cfg = ModelConfig.from_dict(config.model.to_dict())
    plan.check_fits_memory(cfg, *plan.TRAIN_COPIES)
    tc, oc = config.train, optim.OptimConfig.from_dict(config.optim.to_dict())

    # Mesh and data.
    mesh = sharding.make_mesh(config.mesh.to_dict())
    sharding.check_batch(mesh, config.data.global_batch, tc.grad_accum)
    pc = input_pipeline.PipelineConfig(
        paths=tuple(config.data.paths), global_batch=config.data.global_batch, seq_len=config.data.seq_len,
        seed=tc.seed, worker_count=config.data.worker_count,
        allow_mixed_clap=config.data.get("allow_mixed_clap", False),
        verify_sha256=config.data.get("verify_sha256", False),
    )
    eval_paths = input_pipeline.expand_paths(tuple(config.data.eval_paths)) if config.data.eval_paths else []
    input_pipeline.check_seq_len(input_pipeline.expand_paths(pc.paths) + eval_paths, pc.seq_len)  # all in one message
    if config.data.eval_paths:  # found damaged or unfit now (shards, lengths, first record), not at the first evaluation
        input_pipeline.make_dataset(_eval_pipeline(config, verify_sha256=pc.verify_sha256), cfg)
    data_iter = iter(input_pipeline.make_dataset(pc, cfg, jax.process_index(), jax.process_count()))
    # Only now, with the data checked: a damaged shard stops the run before it makes or logs anything.
    os.makedirs(workdir, exist_ok=True)

    # Abstract state, shardings, and the sharded state born on the mesh.
    def create():
        model = TokenSynth(cfg, rngs=nnx.Rngs(tc.seed))
        return model, optim.optimizer_for(model, oc)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=state_shardings)()

    # Restore, or initialise from a model checkpoint.
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_last,
                                        keep_period=tc.keep_every or None,
                                        checksums=tc.get("checkpoint_checksums", True))
    restored = ckpt.restore_latest(abstract_state, state_shardings, data_iter,
                                   require_latest=tc.get("require_latest_checkpoint", False))
    if restored is not None:
        state, start = restored
        log.info("resumed from step %d", start)
    else:
        start = 0
        if init_from:
            loaded, _ = checkpoint.load_model(init_from, mesh)
            if loaded.cfg.replace(**cfg.runtime()) != cfg:
                raise checkpoint.CheckpointError(f"{init_from}: its model config differs from the run's: {loaded.cfg}")
            model, opt = nnx.merge(graphdef, state)
            nnx.update(model, nnx.state(loaded, nnx.Param))
            state = nnx.state((model, opt))

    # Only now, with the checkpoint restored (or the model loaded): a run refused for a model that does
    # not match its checkpoints leaves the record of what it trained as it was.
    log.info("devices: %d (%d processes), model %s", jax.device_count(), jax.process_count(), cfg)
    if jax.process_index() == 0:  # what the run is, for inference checkpoints and sweeps
        # make_dataset has checked that every shard names the same CLAP (unless mixing is
        # allowed, when there is no one CLAP to record), so the first shard speaks for all.
        clap = None if pc.allow_mixed_clap else next(
            filter(None, map(input_pipeline.shard_clap, input_pipeline.expand_paths(pc.paths))), None)
        with open(os.path.join(workdir, "run.json"), "w") as f:
            json.dump({"model": cfg.to_dict(), "codec": config.codec.to_dict(), "clap_model": clap}, f, indent=1)

    # Compile ahead of time with explicit shardings; log the memory plan.
    batch_shardings = ts.batch_shardings(mesh)
    step_fn = ts.jit_train_step(graphdef, state_shardings, batch_shardings, null_rate=tc.null_rate,
                                grad_accum=tc.grad_accum)
    eval_jit = jax.jit(functools.partial(ts.eval_step, graphdef), in_shardings=(state_shardings, batch_shardings))

    # The steps are traced with the mesh in context: the Pallas TPU attention, which XLA cannot
    # partition, is shard_mapped over it (attention._per_shard).
    def eval_fn(*args):
        with jax.set_mesh(mesh):
            return eval_jit(*args)

    def next_batch():
        return to_global(next(data_iter), batch_shardings)

    first = next_batch()
    with jax.set_mesh(mesh):
        compiled = step_fn.lower(state, first, jax.random.PRNGKey(0)).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        log.info("train step memory (MB): arguments %.1f, outputs %.1f, temporaries %.1f",
                 mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)

    # The loop.
    writer = MetricsWriter(workdir, start)
    samples = train_samples.SampleWriter(config, cfg, workdir) if tc.sample_every else None
    base_rng = jax.random.PRNGKey(tc.seed + 1)
    flops_token = model_flops_per_token(cfg, pc.seq_len)
    peak = peak_flops(config)
    last, batch, t0, tokens, skipped = {}, first, time.time(), 0, []
    del first  # a batch from grain's workers (data.worker_count) holds shared memory while referenced
    stop, restore_signals = _install_stop_handlers()
    try:  # whatever ends the loop (a diverged loss too), saves under way finish and workers stop
        for step in range(start, tc.steps):
            state, sums = compiled(state, batch, jax.random.fold_in(base_rng, step))
            skipped.append(sums["skipped_examples"])  # device scalars, fetched at the next metrics line
            tokens += pc.global_batch * pc.seq_len
            done = step + 1
            stopping = stop["stop"]  # read once a step: a signal arriving later in it is the next step's
            saving = stopping or done % tc.checkpoint_every == 0 or done == tc.steps
            logging_step = done % tc.log_every == 0 or done == tc.steps
            if logging_step or saving:  # never a checkpoint of a diverged state
                sums = jax.device_get(sums)
                if not np.isfinite(sums["loss"]) or not np.isfinite(sums["grad_norm"]):
                    ckpt.wait()  # the newest checkpoint named is one that is there
                    raise Diverged(f"step {done}: loss {sums['loss']}, grad norm {sums['grad_norm']}: training diverged "
                                   f"(newest checkpoint: {ckpt.latest_step() or 'none'}); lower --config.optim.peak_lr, "
                                   "or keep --config.optim.clip_norm above 0")
            if logging_step:
                dt = time.time() - t0
                last = {"loss": float(sums["loss"]), "grad_norm": float(sums["grad_norm"]),
                        "lr": float(optim.schedule(oc)(step)), "tokens_per_s": tokens / dt,
                        "model_flops_per_s": tokens * flops_token / dt, **summarize(sums, cfg)}
                if peak:
                    last["mfu"] = last["model_flops_per_s"] / peak
                if count := int(np.sum(jax.device_get(skipped))):  # since the last line, all processes'
                    last["skipped_examples"] = count
                writer.write(done, last)
                t0, tokens, skipped = time.time(), 0, []
            if tc.eval_every and config.data.eval_paths and (done % tc.eval_every == 0 or done == tc.steps):
                writer.write(done, evaluate(eval_fn, state, config, cfg, batch_shardings), "eval")
            if samples is not None and (samples.due(done) or done == tc.steps):
                metrics, clips = samples(done, graphdef, state)
                if metrics:
                    writer.write(done, metrics, "samples")
                writer.write_clips(done, clips)
            if saving:
                ckpt.save(done, state, data_iter, force=True)
            if stopping:
                log.warning("%s: saved step %d, stopping", stopping, done)
                break
            if done < tc.steps:
                batch = next_batch()
    finally:
        restore_signals()
        ckpt.wait()
        ckpt.close()
        writer.close()
        del batch
        data_iter.close()  # stops grain's worker processes (data.worker_count) and frees their buffers
    return last


def _eval_pipeline(config, verify_sha256: bool = False) -> input_pipeline.PipelineConfig:
    """One unshuffled pass over the held-out shards."""
    return input_pipeline.PipelineConfig(
        paths=tuple(config.data.eval_paths), global_batch=config.data.global_batch, seq_len=config.data.seq_len,
        shuffle=False, num_epochs=1, drop_remainder=False,  # a held-out set smaller than a batch is still scored
        allow_mixed_clap=config.data.get("allow_mixed_clap", False), verify_sha256=verify_sha256,
    )


def evaluate(eval_fn, state, config, cfg: ModelConfig, batch_shardings) -> dict:
    """Loss and accuracy on held-out instruments (one pass over up to eval_batches batches)."""
    pc = _eval_pipeline(config)
    totals = None
    for i, local in enumerate(input_pipeline.make_dataset(pc, cfg, jax.process_index(), jax.process_count())):
        if i >= config.train.eval_batches:
            break
        sums = jax.device_get(eval_fn(state, to_global(local, batch_shardings)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return summarize(totals, cfg) if totals is not None else {}
