"""A params-only model checkpoint from a training run (`tokensynth inference-checkpoint`).

A train checkpoint holds the parameters, the optimizer state (twice the parameters' size for
AdamW) and the data iterator; inference and fine-tuning need the parameters alone, in the
model-checkpoint layout that `checkpoint.load_model` (and so `synthesize`, `convert --to
official`, `train --init-from`) reads. The optimizer state is never read.
"""
from __future__ import annotations

import json
import os


def write_inference_checkpoint(config, workdir: str, out_dir: str, step: int | None = None) -> int:
    """Writes the model of `workdir`'s checkpoint at `step` (default newest) to `out_dir`; returns the step.

    Args:
      config: the run's ConfigDict (its `model` gives the shapes; `codec` goes into the metadata).
      workdir: the `--workdir` of `tokensynth train` (checkpoints live in WORKDIR/checkpoints).
      out_dir: the model checkpoint to write.
      step: which saved step (None: the newest).
    """
    from flax import nnx

    from tokensynth_jax import checkpoint
    from tokensynth_jax.config import ModelConfig

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise checkpoint.CheckpointError(f"{workdir}: not a training workdir (no checkpoints/)")
    cfg = ModelConfig.from_dict(config.model.to_dict())
    reader = checkpoint.TrainCheckpointer(ckpt_dir, async_save=False)
    try:
        model, step = reader.restore_params(step, cfg)
    finally:
        reader.close()
    meta = {"weights": "trained", "source": os.path.abspath(workdir), "step": step,
            "codec": _codec_with_checkpoint(config.codec.to_dict(), out_dir)}
    run_info = os.path.join(workdir, "run.json")
    if os.path.isfile(run_info):  # written by `tokensynth train`: which CLAP made the training timbres
        with open(run_info) as f:
            meta["clap_model"] = json.load(f).get("clap_model")
    checkpoint.save_model(out_dir, cfg, nnx.state(model, nnx.Param), meta)
    return step


def _codec_with_checkpoint(codec: dict, out_dir: str) -> dict:
    """The codec entry of the metadata. A fitted codec's state (demo-melrvq) is copied into the
    checkpoint as codec/<name>.npz and named relative to it, so a checkpoint that is moved or
    published decodes without the prep output it was trained from."""
    import shutil

    from tokensynth_jax.audio import encoders

    if not encoders.is_fitted_state(codec.get("name", "")):
        return codec
    info = encoders.codec_info(codec["name"])
    relative = f"codec/{os.path.basename(codec['name'])}"
    os.makedirs(os.path.join(out_dir, "codec"), exist_ok=True)
    tmp = os.path.join(out_dir, relative + ".tmp")
    shutil.copyfile(codec["name"], tmp)
    os.replace(tmp, os.path.join(out_dir, relative))
    return {**codec, "name": relative, "fit": info.fit}


def copy_fitted_codec(metadata: dict, src_dir: str, dst_dir: str) -> None:
    """Copies the fitted codec state that the checkpoint in `src_dir` carries (codec/<name>.npz,
    named relative to it: `_codec_with_checkpoint`) to the same place under `dst_dir`, so that a
    conversion or an export of the checkpoint decodes as the checkpoint does. Other codecs (hub
    ids, absolute paths) are names only, and nothing is copied."""
    import shutil

    from tokensynth_jax.audio import encoders

    name = ((metadata or {}).get("codec") or {}).get("name") or ""
    if not encoders.is_fitted_state(name) or os.path.isabs(name) or "://" in name:
        return
    src = os.path.join(src_dir, name)
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(dst_dir, name)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dst_dir, name))
