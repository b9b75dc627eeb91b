"""Writes the sbatch script that trains on SLURM GPU nodes (one process per node, all its GPUs).

  python launch/slurm.py --nodes 4 --gpus-per-node 8 --config configs/reference.py \
      --workdir /shared/runs/ref -- --config.data.paths=/shared/data/train > train.sbatch
  sbatch train.sbatch

jax.distributed.initialize() reads SLURM's environment (TOKENSYNTH_DISTRIBUTED=auto asks for it).
"""
import argparse
import shlex
import sys


def build(args, extra) -> str:
    train = ["python", "-m", "tokensynth_jax.cli", "train", "--config", args.config, "--workdir", args.workdir, *extra]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --signal=TERM@120  # preemption warning: the trainer saves on SIGTERM",
        f"srun --export=ALL,TOKENSYNTH_DISTRIBUTED=auto {shlex.join(train)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=32)
    parser.add_argument("--time", default="72:00:00")
    parser.add_argument("--job-name", default="tokensynth-train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    sys.stdout.write(build(args, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
