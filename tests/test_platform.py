"""The real components later stages rely on: Open MPI + mpi4py, and Slurm launching MPI tasks via pmix."""

import subprocess
from pathlib import Path

import pytest

from tests.conftest import python, require_cmd

ALLREDUCE = (
    "from mpi4py import MPI; c = MPI.COMM_WORLD; "
    "print(f'SUM {c.allreduce(c.Get_rank() + 1)} {c.Get_size()}', flush=True)"  # one write: lines cannot interleave
)


@pytest.mark.distributed
def test_mpirun_two_ranks_allreduce():
    require_cmd("mpirun")
    proc = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", python(), "-c", ALLREDUCE],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("SUM 3 2") == 2


@pytest.mark.distributed
def test_sbatch_srun_pmix_two_tasks(slurm, tmp_path: Path):
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\nsrun --mpi=pmix -n 2 {python()} -c "{ALLREDUCE}"\n')
    job = slurm.sbatch(script, "-N", "1", "-n", "2", "-o", str(out))
    state = slurm.wait(job, timeout=120)
    assert state == "COMPLETED", f"{state}: {out.read_text() if out.exists() else ''}\n{slurm.log_tail()}"
    assert out.read_text().count("SUM 3 2") == 2
