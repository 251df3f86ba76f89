"""Where this process stands in the job: torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) filled in from whichever launcher started it.

- torchrun, `deepspeed`: they set the variables; nothing to do.
- Slurm's `srun` (one task per GPU): rank from SLURM_PROCID, world from SLURM_STEP_NUM_TASKS (set only inside a
  job step, so a batch script's own `python` is not mistaken for task 0 of many), local rank from SLURM_LOCALID,
  the master address from the step's first node (`scontrol show hostnames`), the port from MASTER_PORT or the job
  id.
- MPI (`mpirun`, or `srun --mpi=pmix` with MEGADALLE_RENDEZVOUS=mpi): mpi4py gives rank, size and node-local
  rank; rank 0 names its address and a free port to all.
- Otherwise a world of one on a free local port.

MEGADALLE_RENDEZVOUS = auto | env | slurm | mpi forces one of them.
"""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[001-128]" -> "gpu001")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"cannot expand the Slurm node list {nodelist!r} with scontrol: {e}") from None
    return out.stdout.split()[0]


def _slurm() -> dict[str, str]:
    e = os.environ
    nodes = e.get("SLURM_STEP_NODELIST") or e["SLURM_JOB_NODELIST"]
    return {
        "RANK": e["SLURM_PROCID"],
        "WORLD_SIZE": e["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": e.get("MASTER_ADDR") or first_host(nodes),
        # the same on every task without talking: derived from the job id (a requeued job keeps its id; the
        # store's socket is opened with SO_REUSEADDR)
        "MASTER_PORT": e.get("MASTER_PORT") or str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 10000),  # < 32768
    }


def _mpi() -> dict[str, str]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    where = None
    if comm.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()  # a name the other nodes resolve
        where = (host, os.environ.get("MASTER_PORT") or str(free_port()))
    host, port = comm.bcast(where, root=0)
    return {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local),
            "MASTER_ADDR": host, "MASTER_PORT": port}  # fmt: skip


def detect() -> str:
    """The launcher that started this process: env | slurm | mpi | single."""
    forced = os.environ.get("MEGADALLE_RENDEZVOUS", "auto")
    if forced not in ("auto", "env", "slurm", "mpi"):
        raise ValueError(f"MEGADALLE_RENDEZVOUS={forced!r}: expected auto, env, slurm or mpi")
    if forced != "auto":
        return forced
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in os.environ:  # mpirun, even inside a Slurm allocation's shell
        return "mpi"
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return "slurm"
    if "PMI_SIZE" in os.environ:
        return "mpi"
    return "single"


def rendezvous_env() -> str:
    """Fill torch.distributed's variables in from the launcher (see the module docstring); return its name."""
    kind = detect()
    if kind == "slurm":
        os.environ.update(_slurm())
    elif kind == "mpi":
        os.environ.update(_mpi())
    elif kind == "single":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not")
    os.environ.setdefault("LOCAL_RANK", "0")
    return kind
