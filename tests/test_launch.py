"""launch/ scripts build the train command for TPU VMs and SLURM with the distributed switch."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], check=True,
                          capture_output=True, text=True).stdout


def test_tpu_vm_command_runs_the_trainer_on_every_worker():
    out = _run("tpu_vm.py", "--tpu", "v5e-64", "--zone", "us-west4-a", "--config", "configs/reference.py",
               "--workdir", "gs://b/run", "--", "--config.data.paths=gs://b/data")
    assert "--worker=all" in out and "TOKENSYNTH_DISTRIBUTED=auto" in out
    assert "tokensynth_jax.cli train --config configs/reference.py --workdir gs://b/run --config.data.paths=gs://b/data" in out


def test_slurm_script_has_one_task_per_node_and_the_preemption_signal():
    out = _run("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--config", "configs/reference.py",
               "--workdir", "/shared/run")
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out and "TERM@" in out
    assert out.strip().splitlines()[-1].startswith("srun --export=ALL,TOKENSYNTH_DISTRIBUTED=auto python -m tokensynth_jax.cli train")
