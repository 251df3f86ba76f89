"""Shared fixtures. Real components only: where one cannot run here, its tests skip with the reason, except
under MEGADALLE_REQUIRE_ALL=1 (set by .ci/run), where the skip becomes a failure."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
if not torch.cuda.is_available():  # Triton kernels run under the interpreter on the CPU; set before any @triton.jit
    os.environ.setdefault("TRITON_INTERPRET", "1")
flush_denormals()  # the float mode of every entry point (and test worker): references compute as train.py does
sys.path.insert(0, str(REPO / "tools"))  # the tools' helpers (train_tokenizer.captions, ...) are tested too


def require(ok: bool, reason: str) -> None:
    """Skip (or, in CI, fail) when a real component the test needs is not available."""
    if ok:
        return
    if os.environ.get("MEGADALLE_REQUIRE_ALL") == "1":
        pytest.fail(f"required component missing (MEGADALLE_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def require_cmd(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"'{name}' is not installed (make sysdeps installs it as root)")


def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real shard set from both packaged emoji sources (a few hundred images at 32 px)."""
    from megadalle.config import Data
    from megadalle.data.emoji_shards import build_emoji_shards

    out = tmp_path_factory.mktemp("shards")
    data = Data(image_size=32, limit_per_source=300, shard_max_samples=128, val_percent=10, zeroshot_percent=30)
    build_emoji_shards(data, out, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def img2dataset_shards(emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train folder, val folder) of img2dataset-style shards with planted faults (tests/data/img2dataset.py)."""
    from tests.data.img2dataset import build

    return build(emoji_shards, tmp_path_factory.mktemp("img2dataset"))


@pytest.fixture(scope="session")
def tokenizer_model(emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megadalle.data.loader import captions
    from megadalle.models.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    return Path(train_bpe(captions(str(emoji_shards)), out / "bpe", vocab_size=300))


def torchrun(script: str | Path, nproc: int = 2, args: list[str] | None = None, timeout: float = 300):
    """Run `script` on `nproc` real processes with torchrun; returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [python(), "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(script), *(args or [])]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _run(cmd: list[str], timeout: float = 300):
    import subprocess

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def dvae_checkpoint(emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug dVAE trained for 3 updates with train.py (single process)."""
    root = tmp_path_factory.mktemp("run")
    _run([python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
          f"--data.shards={emoji_shards}", f"--job.run_root={root}", "--train.steps=3",
          "--train.eval_every=0"])  # fmt: skip
    return root / "dvae_debug" / "checkpoints" / "step_00000003"


@pytest.fixture(scope="session")
def token_shards(dvae_checkpoint: Path, emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The emoji shards encoded by the debug dVAE: 8x8 grids of 256 codes."""
    out = tmp_path_factory.mktemp("tokens")
    _run([python(), "tools/encode_shards.py", "--checkpoint", str(dvae_checkpoint), "--shards", str(emoji_shards),
          "--out", str(out)])  # fmt: skip
    return out


FLAWS = {"undecodable image": 16, "empty caption": 16, "over-long caption": 1}  # of flawed_shards' 96 train samples


@pytest.fixture(scope="session")
def flawed_shards(emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The emoji set with its train split cut to 96 samples in 3 shards, a third of them unusable (FLAWS): sample
    i has a broken PNG when i % 6 == 1, an empty caption when i % 6 == 4, and sample 9 a 5,000-character one.
    The val and zeroshot splits are the emoji set's; the manifest is rewritten to match."""
    import json

    from megadalle.data.s3 import samples
    from megadalle.data.shards import MANIFEST, ShardWriter, read_manifest, split_urls

    out = tmp_path_factory.mktemp("flawed")
    manifest = read_manifest(emoji_shards)
    for split in ("val", "zeroshot"):
        shutil.copytree(emoji_shards / split, out / split)
    writer = ShardWriter(out / "train", "train", 32)
    for i, sample in enumerate(samples(split_urls(emoji_shards, "train"))):
        if i == 96:
            break
        sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        if i % 6 == 1:
            sample["png"] = b"\x89PNG\r\n\x1a\n broken"
        elif i % 6 == 4:
            sample["txt"] = b" "
        elif i == 9:
            sample["txt"] = b"y" * 5000
        writer.write(sample)
    records = writer.close()
    manifest["splits"]["train"] = {"samples": 96, "shards": records}
    manifest["samples"] = sum(s["samples"] for s in manifest["splits"].values())
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def s3_server(emoji_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS, tests/s3server.py) holding the emoji train shards under s3://shards/emoji/train/;
    this process's environment points boto3 at it (AWS_ENDPOINT_URL and keys) while the session runs."""
    from megadalle.data import s3 as s3mod
    from megadalle.data.shards import split_urls
    from tests.s3server import BUCKET, SeaweedS3

    srv = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    saved = dict(os.environ)
    os.environ.update(srv.env())
    s3mod._client.cache_clear()
    c = srv.client()
    local = split_urls(emoji_shards, "train")
    for path in local:
        c.upload_file(path, BUCKET, f"emoji/train/{Path(path).name}")
    srv.local = local
    yield srv
    os.environ.clear()
    os.environ.update(saved)
    s3mod._client.cache_clear()
    srv.kill()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real Slurm controller and node daemon on localhost (tests/cluster.py), for the whole session."""
    from tests.cluster import SlurmCluster, slurm_available

    require(slurm_available(), "Slurm (slurmctld, slurmd, slurm-client) is not installed")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), free_port(), free_port()).start()
    yield cluster
    cluster.stop()
