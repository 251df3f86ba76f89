"""Real Slurm (slurmctld + slurmd) on localhost for tests, with auth/none and a config in a temp folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=megadalle-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire (120 s by default) before it may start again
AuthInfo=cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
NodeName=localhost CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, folder: Path, ctld_port: int, d_port: int) -> None:
        self.folder = folder
        for sub in ("state", "spool"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf = folder / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(d=folder, ctld_port=ctld_port, d_port=d_port))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """A Slurm command; `env`: variables added to the environment (sbatch passes them on to the job)."""
        return subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, check=check,
                              timeout=timeout)  # fmt: skip

    def start(self) -> SlurmCluster:
        self.run("slurmctld", "-c", "-i")
        self.run("slurmd", "-c")
        deadline = time.time() + 30
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"slurm did not become idle: {out!r}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(
            p.read_text()[-2000:] for p in (self.folder / "slurmctld.log", self.folder / "slurmd.log") if p.exists()
        )

    def sbatch(
        self, script: Path, *args: str, env: dict[str, str] | None = None, script_args: tuple[str, ...] = ()
    ) -> int:
        out = self.run("sbatch", "--parsable", *args, str(script), *script_args, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, timeout: float = 300) -> str:
        """Poll (faster than `sbatch --wait`'s back-off) until the job ends; return its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
            m = re.search(r"JobState=(\w+)", out)
            if m and m.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return m.group(1)
            time.sleep(0.3)
        self.run("scancel", str(job_id), check=False)
        raise TimeoutError(f"slurm job {job_id} still running after {timeout} s")

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        for pidfile in ("slurmd.pid", "slurmctld.pid"):
            p = self.folder / pidfile
            if p.exists():
                try:
                    os.kill(int(p.read_text().strip()), 9)
                except (ProcessLookupError, ValueError):
                    pass


def slurm_available() -> bool:
    return all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol"))
