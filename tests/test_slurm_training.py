"""slurm/train_debug.sh on a real Slurm (tests/cluster.py: slurmctld + slurmd on localhost): 2 tasks to the end
(srun, and PMIx with mpi4py discovery); a SIGUSR1 that checkpoints, requeues and resumes to the weights of an
uninterrupted run (exactly up to the update after the stop, then within PowerSGD's resume error); a kill -9 in
the middle of a checkpoint write; a killed and a stopped rank that end the job within 60 s naming it; a
resubmission that resumes; tools/monitor.py and tools/plot_run.py on the runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megadalle.engine.checkpoint import load_eval_weights
from tests.conftest import REPO, python

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "train_debug.sh"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class Job:
    """One submission of slurm/train_debug.sh with its run folder under `root`."""

    def __init__(self, slurm, root: Path, tokens: Path, tokenizer: Path, *args: str, env: dict | None = None):
        self.slurm, self.root = slurm, root
        self.run = root / "prior_debug"
        self.out = root / f"job-{len(list(root.glob('job-*.out'))) if root.exists() else 0}.out"
        root.mkdir(parents=True, exist_ok=True)
        variables = {"TOKENS": str(tokens), "TOKENIZER": str(tokenizer), "RUN_ROOT": str(root), "PYTHON": python(),
                     "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
        base = ("--train.eval_every=0", "--train.log_every=2")
        self.id = slurm.sbatch(SCRIPT, "--chdir", str(REPO), "-o", str(self.out), env=variables,
                               script_args=(*base, *args))  # fmt: skip

    def state(self) -> dict[str, str]:
        return self.slurm.job(self.id)

    def wait(self, timeout: float = 240) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state().get("JobState", "")
            if state in TERMINAL:
                return state
            time.sleep(0.2)
        self.slurm.run("scancel", str(self.id), check=False)
        raise TimeoutError(f"job {self.id} not finished after {timeout} s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        logs = sorted((self.run / "logs").glob("rank*.log")) if (self.run / "logs").is_dir() else []
        return "\n".join(p.read_text() for p in [self.out, *logs] if p.is_file())

    def train_lines(self) -> list[dict]:
        path = self.run / "metrics.jsonl"
        if not path.is_file():
            return []
        return [m for m in map(json.loads, path.read_text().splitlines()) if m["kind"] == "train"]

    def wait_steps(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while len(self.train_lines()) < n:
            if time.time() > deadline or self.state().get("JobState") in TERMINAL:
                raise AssertionError(f"job {self.id} did not reach {n} steps:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def pids(self) -> dict[int, int]:
        """rank -> pid, from the ranks' status files."""
        return {s["rank"]: s["pid"] for s in (json.loads(p.read_text()) for p in (self.run / "status").glob("*.json"))}


@pytest.fixture
def submit(slurm, token_shards, tokenizer_model):
    def make(root: Path, *args: str, env: dict | None = None) -> Job:
        return Job(slurm, root, token_shards, tokenizer_model, *args, env=env)

    return make


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_eval_weights(run / "checkpoints" / f"step_{step:08d}")[0]  # the EMA, from its shard files


@pytest.fixture(scope="module")
def finished_run(slurm, token_shards, tokenizer_model, tmp_path_factory) -> Job:
    job = Job(slurm, tmp_path_factory.mktemp("slurm_run"), token_shards, tokenizer_model, "--train.steps=6")
    assert job.wait() == "COMPLETED", job.text()[-3000:]
    return job


def test_sbatch_train_debug_runs_two_tasks_to_the_end(finished_run) -> None:
    job, run = finished_run, finished_run.run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6] and lines[-1]["kind"] == "end"
    last = lines[-2]
    for key in ("loss", "text_loss", "image_loss", "lr", "grad_norm", "skipped_steps", "skipped_samples",
                "images_per_s", "tokens_per_s", "tflops", "memory_mb", "powersgd_mb_sent", "time"):  # fmt: skip
        assert key in last, key
    assert last["powersgd_mb_sent"] > 0  # two node groups of one rank: PowerSGD between them
    text = job.text()
    assert "launcher slurm" in text and "train step 6" in job.out.read_text()  # the readable rank-0 line
    for rank in (0, 1):  # every rank's own log, with its rank in each line, and its status
        log = (run / "logs" / f"rank{rank:05d}.log").read_text()
        assert f"[rank {rank}]" in log and f"rank {rank} of 2" in log
        assert json.loads((run / "status" / f"rank{rank:05d}.json").read_text())["state"] == "done"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_srun_pmix_with_mpi4py_discovery(submit, tmp_path) -> None:
    job = submit(tmp_path, "--train.steps=2", env={"SRUN_MPI": "pmix"})
    assert job.wait() == "COMPLETED", job.text()[-3000:]
    assert "launcher mpi" in job.text() and [m["step"] for m in job.train_lines()] == [1, 2]


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(slurm, submit, tmp_path) -> None:
    """Interrupted after a few updates by SIGUSR1 (what --signal=USR1@T sends near the time limit): the job saves,
    requeues itself and resumes; its final weights equal an uninterrupted run's within PowerSGD's resume error."""
    steps = ("--train.steps=24",)
    whole = submit(tmp_path / "whole", *steps)
    job = submit(tmp_path / "cut", *steps)
    job.wait_steps(5)
    slurm.run("scancel", "--signal=USR1", str(job.id))
    deadline = time.time() + 120
    while job.state().get("Restarts") != "1" or job.state().get("JobState") != "PENDING":
        assert time.time() < deadline and job.state().get("JobState") not in TERMINAL, job.text()[-3000:]
        time.sleep(0.2)
    # Slurm holds a requeued job for cred_expire + 1 s (6 s here, tests/cluster.py): its launch credential was
    # revoked with the first run, and a start inside that window is killed ("Job credential revoked")
    states = (job.wait(), whole.wait())
    assert states == ("COMPLETED", "COMPLETED"), f"{states}\n{job.text()[-3000:]}\n{slurm.log_tail()}"
    lines = [json.loads(x) for x in (job.run / "metrics.jsonl").read_text().splitlines()]
    stop = [m for m in lines if m["kind"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == "signal USR1" and 5 <= stop[0]["step"] < 24
    assert [m["step"] for m in lines if m["kind"] == "train"] == list(range(1, 25))  # each update once
    text = job.text()
    assert "requeued Slurm job" in text and f"resumed from {job.run / 'checkpoints'}" in text
    # exact up to the update after the stop (the checkpoint, the data position and the generators resume as they
    # were); after it the runs differ by PowerSGD's error buffers only, which a checkpoint keeps as their sum over
    # the node groups and a resume splits evenly (App. E.2): measured 9e-5 absolute, 4e-4 relative per tensor
    k = stop[0]["step"]
    losses = [[m["loss"] for m in j.train_lines()] for j in (job, whole)]
    assert losses[0][: k + 1] == losses[1][: k + 1]
    a, b = _weights(job.run, 24), _weights(whole.run, 24)
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-3), name
        assert (a[name] - b[name]).norm() <= 2e-3 * b[name].norm(), name


def test_kill9_during_a_checkpoint_write_resumes_from_the_previous_one(slurm, submit, tmp_path) -> None:
    job = submit(tmp_path, "--train.steps=40", "--checkpoint.every=4")
    second = job.run / "checkpoints" / "step_00000008"
    deadline, checked = time.time() + 180, 0.0
    while not second.is_dir():  # polled every millisecond; the job's state (an scontrol call) twice a second
        if time.time() - checked > 0.5:
            assert time.time() < deadline and job.state().get("JobState") not in TERMINAL, job.text()[-3000:]
            checked = time.time()
        time.sleep(0.001)
    pids = job.pids()
    for pid in pids.values():  # frozen mid-write, then killed: as a node that loses power
        os.kill(pid, signal.SIGSTOP)
    assert not (second / "COMPLETE").exists()
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    assert job.wait() in ("FAILED", "CANCELLED")
    again = submit(tmp_path, "--train.steps=10", "--checkpoint.every=4")
    assert again.wait() == "COMPLETED", again.text()[-3000:]
    text = again.text()
    assert f"skipping checkpoint {second}" in text and "at step 4" in text
    assert [m["step"] for m in again.train_lines()][-6:] == [5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_rank_ends_the_job_within_60_s_naming_it(slurm, submit, tmp_path, how) -> None:
    """kill -9 of rank 1 (srun sees it die), or SIGSTOP (a frozen node: only the heartbeat notices); then a
    resubmission resumes from the last checkpoint."""
    job = submit(tmp_path, "--train.steps=400", "--checkpoint.every=3")
    job.wait_steps(7)
    pid = job.pids()[1]
    t0 = time.time()
    os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    state = job.wait(timeout=90)
    elapsed = time.time() - t0
    if how == "stop":
        with contextlib.suppress(ProcessLookupError):  # srun has usually killed it with the step
            os.kill(pid, signal.SIGKILL)
    assert state == "FAILED" and elapsed < 60, (state, elapsed)
    text = job.text()
    # named by the heartbeat (a stopped rank), or by rank 0 when its collective failed (a killed one; srun too)
    assert f"rank 1 ({socket.gethostname()} pid {pid})" in text, text[-3000:]
    assert how == "stop" or "task 1: Killed" in text
    again = submit(tmp_path, "--train.steps=8", "--checkpoint.every=3")
    assert again.wait() == "COMPLETED", again.text()[-3000:]
    assert "resumed from" in again.text() and again.train_lines()[-1]["step"] == 8


def test_monitor_flags_a_nan_burst_and_a_silent_rank(finished_run, tmp_path) -> None:
    monitor = [python(), "tools/monitor.py"]
    ok = subprocess.run([*monitor, str(finished_run.run)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and ": done | step 6/6" in ok.stdout, ok.stdout + ok.stderr
    run = tmp_path / "live"
    shutil.copytree(finished_run.run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:-1]  # a run still going: no end line
    now = time.time()
    for k, line in enumerate(lines[-4:]):  # the last 4 updates diverged
        m = json.loads(line)
        m.update(loss="nan", grad_norm="inf", time=now - 4 + k)
        lines[len(lines) - 4 + k] = json.dumps(m)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for rank, age in ((0, 1), (1, 900)):  # rank 1 last heard 15 minutes ago
        path = run / "status" / f"rank{rank:05d}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "state": "training", "time": now - age}))
    alarmed = subprocess.run([*monitor, str(run)], cwd=REPO, capture_output=True, text=True)
    assert alarmed.returncode == 1, alarmed.stdout + alarmed.stderr
    assert "ALARM NaN burst: 4 non-finite losses" in alarmed.stdout
    assert (
        f"ALARM silent rank 1 ({socket.gethostname()} pid" in alarmed.stdout
        and "ALARM silent rank 0" not in alarmed.stdout
    )
    plot = subprocess.run([python(), "tools/plot_run.py", str(run)], cwd=REPO, capture_output=True, text=True)
    assert plot.returncode == 0 and (run / "run.png").stat().st_size > 10_000, plot.stderr
