"""Builds (and with --run, runs) the command that trains on every worker of a Cloud TPU VM slice.

  python launch/tpu_vm.py --tpu my-v5e-64 --zone us-west4-a --config configs/reference.py \
      --workdir gs://bucket/runs/ref -- --config.data.paths=gs://bucket/data/train

Every worker runs the same `python -m tokensynth_jax.cli train`; TOKENSYNTH_DISTRIBUTED=auto
makes it call jax.distributed.initialize(), which reads the slice's topology.
"""
import argparse
import shlex
import subprocess
import sys


def build(args, extra) -> list[str]:
    train = ["python3", "-m", "tokensynth_jax.cli", "train", "--config", args.config, "--workdir", args.workdir, *extra]
    remote = f"cd {shlex.quote(args.repo_dir)} && TOKENSYNTH_DISTRIBUTED=auto {shlex.join(train)}"
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
            *([f"--project={args.project}"] if args.project else []), "--worker=all", f"--command={remote}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpu", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--repo-dir", default="~/tokensynth-jax", help="checkout on every worker")
    parser.add_argument("--run", action="store_true", help="run it instead of printing it")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    cmd = build(args, extra)
    if args.run:
        return subprocess.call(cmd)
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
