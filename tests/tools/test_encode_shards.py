import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, eval_tokens, train_tokens
from megadalle.data.shards import MANIFEST, read_manifest, split_urls, verify_shards
from megadalle.data.token_shards import RECORD
from megadalle.engine.checkpoint import load_eval_weights
from megadalle.engine.distributed import free_port
from tests.conftest import REPO, python


def tokens(root: Path, split: str) -> dict[str, tuple[np.ndarray, str, dict]]:
    ds = wds.WebDataset(split_urls(root, split), shardshuffle=False, empty_check=False).decode()
    return {s["__key__"]: (s["tokens.npy"], s["txt"], s["json"]) for s in ds}


def test_encoding_is_deterministic_and_complete(dvae_checkpoint, emoji_shards, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run(
            [python(), "tools/encode_shards.py", "--checkpoint", str(dvae_checkpoint), "--shards", str(emoji_shards),
             "--out", str(out), "--batch", "7"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "into 8x8 grids of 256 codes" in proc.stdout
        outs.append(out)
    image_manifest, token_manifest = read_manifest(emoji_shards), read_manifest(outs[0])
    assert verify_shards(outs[0]) == image_manifest["samples"]
    assert token_manifest["grid"] == [8, 8] and token_manifest["vocab_size"] == 256
    for split in image_manifest["splits"]:
        a, b = tokens(outs[0], split), tokens(outs[1], split)
        assert len(a) == image_manifest["splits"][split]["samples"]
        assert a.keys() == b.keys()
        for key, (t, caption, meta) in a.items():
            assert t.shape == (8, 8) and t.dtype == np.int16 and 0 <= t.min() and t.max() < 256
            assert np.array_equal(t, b[key][0]) and caption == b[key][1]
            assert meta["grid"] == [8, 8] and meta["split"] == split


def test_ema_weights_in_checkpoint_and_errors(dvae_checkpoint, tmp_path):
    state, cfg = load_eval_weights(dvae_checkpoint)
    assert "encoder.blocks.input.w" in state and cfg.model.dvae_flavor == "debug"
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_eval_weights(tmp_path / "nothing")
    proc = subprocess.run(
        [python(), "tools/encode_shards.py", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "no checkpoint file" in proc.stderr


@pytest.fixture(scope="module")
def emoji_shards_36(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Emoji images at 36 px = 9/8 of the debug dVAE's 32: room for Listing 2's resize and crop."""
    from megadalle.config import Data
    from megadalle.data.emoji_shards import build_emoji_shards

    out = tmp_path_factory.mktemp("shards36")
    data = Data(image_size=36, limit_per_source=40, shard_max_samples=32, val_percent=20, zeroshot_percent=30)
    build_emoji_shards(data, out, seed=1, progress=False)
    return out


def encode(checkpoint: Path, shards: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [python(), "tools/encode_shards.py", "--checkpoint", str(checkpoint), "--shards", str(shards),
         "--out", str(out), "--batch", "5", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_augmented_train_encodings(dvae_checkpoint, emoji_shards_36, tmp_path):
    one, three = tmp_path / "k1", tmp_path / "k3"
    encode(dvae_checkpoint, emoji_shards_36, one)
    encode(dvae_checkpoint, emoji_shards_36, three, "--augmentations", "3", "--seed", "4")
    m1, m3 = read_manifest(one), read_manifest(three)
    assert m1["augmentations"] == 1 and m3["augmentations"] == 3 and m3["central_only"] == 0
    assert verify_shards(three) == read_manifest(emoji_shards_36)["samples"]
    train1, train3 = tokens(one, "train"), tokens(three, "train")
    assert train1.keys() == train3.keys() and len(train3) > 10
    differ = 0
    for key, (t, _caption, meta) in train3.items():
        assert t.shape == (3, 8, 8) and t.dtype == np.int16 and 0 <= t.min() and t.max() < 256
        assert meta["augmentations"] == 3
        assert np.array_equal(t[0], train1[key][0]), "index 0 is the central view, the K = 1 encoding"
        differ += not np.array_equal(t[1], t[0]) or not np.array_equal(t[2], t[0])
    assert differ > len(train3) // 2, f"only {differ} of {len(train3)} images have Listing 2 views that differ"
    for split in ("val", "zeroshot"):  # evaluation keeps the single central view, as (h, w)
        a, b = tokens(one, split), tokens(three, split)
        assert a.keys() == b.keys() and all(np.array_equal(b[k][0], a[k][0]) and b[k][0].shape == (8, 8) for k in a)
    encode(dvae_checkpoint, emoji_shards_36, tmp_path / "again", "--augmentations", "3", "--seed", "4")
    again = tokens(tmp_path / "again", "train")
    assert all(np.array_equal(again[k][0], t) for k, (t, _, _) in train3.items()), "seeded: reproducible"

    # the loaders: train draws one of the K views per sample, deterministic per seed; eval takes view 0
    views = {(tuple(t[i].reshape(-1)), c) for t, c, _ in train3.values() for i in range(3)}
    firsts = {(tuple(t[0].reshape(-1)), c) for t, c, _ in train3.values()}

    def draw(seed: int) -> list[tuple[tuple[int, ...], str]]:
        stream = iter(train_tokens(Data(shuffle_buffer=10), str(three), 8, rank=0, seed=seed, skips=SkipCounter()))
        rows = []
        for _ in range(12):
            codes, captions = next(stream)
            assert codes.shape == (8, 64) and codes.dtype == torch.int64
            assert 0 <= codes.min() and codes.max() < 256
            rows += [(tuple(r.tolist()), c) for r, c in zip(codes, captions)]
        return rows

    rows = draw(0)
    assert rows == draw(0), "deterministic for a seed"
    assert all(r in views for r in rows), "every drawn grid is one of the stored views of its image"
    assert sum(r not in firsts for r in rows) > len(rows) // 4, "views 1..K-1 are drawn too"
    codes, captions, _ = next(eval_tokens(str(three), "train", 1000))
    assert {(tuple(r.tolist()), c) for r, c in zip(codes, captions)} <= firsts, "eval_tokens takes view 0"


def test_augmentations_fall_back_to_the_central_view_without_room(dvae_checkpoint, emoji_shards, tmp_path):
    # 32 px images for a 32 px dVAE: Listing 2 can neither resize nor crop, so the views repeat, and it says so
    proc = encode(dvae_checkpoint, emoji_shards, tmp_path / "k2", "--augmentations", "2")
    m = read_manifest(tmp_path / "k2")
    assert m["augmentations"] == 2 and m["central_only"] == m["splits"]["train"]["samples"] > 0
    assert "leave Listing 2 no room" in proc.stderr
    assert all(np.array_equal(t[0], t[1]) for t, _, _ in tokens(tmp_path / "k2", "train").values())


def run_encode(checkpoint: Path, out: Path | str, *flags: str, nproc: int = 1, wait: bool = True, ok: bool = True):
    """tools/encode_shards.py on `nproc` processes (torchrun), one thread each, so 1 and 2 ranks compute alike."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [python(), "tools/encode_shards.py"]
    if nproc > 1:
        cmd = [python(), "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "tools/encode_shards.py"]  # fmt: skip
    cmd += ["--checkpoint", str(checkpoint), "--out", str(out), "--batch", "5", *flags]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_img2dataset_shards_encode_alike_on_1_2_and_4_ranks_and_resume_after_a_kill(
    dvae_checkpoint, img2dataset_shards, tmp_path
):
    from tests.data.img2dataset import FAULTS, MAX_ASPECT, MIN_SIDE, PER_SHARD, SHARDS, VAL

    train, val = img2dataset_shards
    flags = [
        "--shards",
        str(train),
        "--val-shards",
        str(val),
        "--augmentations",
        "2",
        f"--data.min_image_side={MIN_SIDE}",
        f"--data.max_aspect_ratio={MAX_ASPECT}",
    ]
    run_encode(dvae_checkpoint, tmp_path / "one", *flags)
    one = tree(tmp_path / "one")
    for n in (2, 4):
        proc = run_encode(dvae_checkpoint, tmp_path / f"n{n}", *flags, nproc=n)
        assert f"rank {n - 1}:" in proc.stdout and f"on {n} ranks" in proc.stdout
        other = tree(tmp_path / f"n{n}")
        assert sorted(one) == sorted(other) and all(one[k] == other[k] for k in one), f"{n} ranks write as 1 does"
    m = read_manifest(tmp_path / "one")
    assert [Path(r["path"]).name for r in m["splits"]["train"]["shards"]] == [f"{i:05d}.tar" for i in range(SHARDS)]
    by_reason = m["skipped"]["by_reason"]
    lost = sum(n for why, n in by_reason.items() if "tar" in why)
    assert {k: v for k, v in by_reason.items() if "tar" not in k} == FAULTS and lost > 0
    assert m["splits"]["train"]["samples"] + m["skipped"]["total"] == SHARDS * PER_SHARD
    assert m["splits"]["val"]["samples"] == VAL
    assert verify_shards(tmp_path / "one") == m["samples"]
    t = tokens(tmp_path / "one", "train")
    assert all(v[0].shape == (2, 8, 8) for v in t.values()) and len(t) == m["splits"]["train"]["samples"]

    # killed mid-way: shard 2 of a .txt list is a FIFO, so the encoder blocks inside it (its partial output open)
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    for i in range(SHARDS):
        name = f"{i:05d}"
        shutil.copy(train / f"{name}_stats.json", stuck)
        if i == 2:
            os.mkfifo(stuck / f"{name}.tar")
        else:
            shutil.copy(train / f"{name}.tar", stuck)
    listing = stuck / "train.txt"
    listing.write_text("".join(f"{i:05d}.tar\n" for i in range(SHARDS)))
    flags[1] = str(listing)
    out = tmp_path / "killed"
    p = run_encode(dvae_checkpoint, out, *flags, wait=False)
    try:
        deadline = time.time() + 120
        while not (out / "train" / f"00001{RECORD}").exists() or not list((out / "train").glob("00002.tar.tmp*")):
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline, "the encoder did not reach the blocked shard in 120 s"
            time.sleep(0.05)
    finally:
        p.kill()
        p.communicate()
    assert not (out / MANIFEST).exists() and not (out / "train" / "00002.tar").exists()
    (stuck / "00002.tar").unlink()
    shutil.copy(train / "00002.tar", stuck)
    proc = run_encode(dvae_checkpoint, out, *flags, nproc=2)  # resumed on another number of ranks
    assert sum(int(n) for n in re.findall(r"(\d+) were done before", proc.stdout)) == 2, proc.stdout
    again, first = tree(out), tree(tmp_path / "one")
    assert not [k for k in again if ".tmp" in k], "the killed run's partial shard is gone"
    for split in ("train", "val"):
        names = sorted(k for k in first if k.startswith(split) and k.endswith(".tar"))
        assert names == sorted(k for k in again if k.startswith(split) and k.endswith(".tar"))
        assert all(first[k] == again[k] for k in names), "the resumed set equals an uninterrupted one"
    # other flags (a new seed for the Listing 2 views): every record is stale, every shard encoded again
    proc = run_encode(dvae_checkpoint, out, *flags, "--seed", "5")
    assert "0 were done before" in proc.stdout
    assert read_manifest(out)["augment_seed"] == 5 and tree(out)["val/00000.tar"] == first["val/00000.tar"]


@pytest.mark.distributed  # the S3 server process
def test_token_shards_written_to_s3_equal_local_ones_and_train_the_prior_stream(
    dvae_checkpoint, img2dataset_shards, s3_server, tmp_path
):
    from megadalle.data.s3 import S3Settings, open_shard
    from megadalle.data.shards import read_any_manifest
    from tests.s3server import BUCKET

    train, val = img2dataset_shards
    flags = ["--shards", str(train), "--val-shards", str(val)]
    run_encode(dvae_checkpoint, tmp_path / "local", *flags)
    remote = f"s3://{BUCKET}/tokens/"
    proc = run_encode(dvae_checkpoint, remote, *flags)  # the environment points boto3 at the server
    assert f"-> {remote.rstrip('/')}/{MANIFEST}" in proc.stdout
    local, m = read_manifest(tmp_path / "local"), read_any_manifest(remote, S3Settings())
    assert m["splits"] == local["splits"]
    for split in m["splits"].values():
        for rec in split["shards"]:
            with open_shard(remote + rec["path"]) as f:
                assert f.read() == (tmp_path / "local" / rec["path"]).read_bytes()
    rerun = run_encode(dvae_checkpoint, remote, *flags)
    assert f"{len(m['splits']['train']['shards']) + 1} were done before" in rerun.stdout, "records read from S3"
    stream = train_tokens(Data(shuffle_buffer=4), remote, 4, rank=0, seed=0, skips=SkipCounter(), world=1)
    stream.max_epochs = 1
    assert sum(len(c) for _, c in stream) == m["splits"]["train"]["samples"]


@pytest.mark.distributed
def test_a_failing_rank_stops_every_rank_without_a_manifest(dvae_checkpoint, img2dataset_shards, tmp_path):
    train, _ = img2dataset_shards
    proc = run_encode(dvae_checkpoint, tmp_path / "a", "--shards", str(tmp_path / "nothing"), nproc=2, ok=False)
    assert proc.stderr.count("encode_shards: error: ") == 2 and str(tmp_path / "nothing") in proc.stderr
    # shard 1 of 3 (rank 1's) cannot be opened: rank 0 encodes its two, then both stop
    (tmp_path / "dir.tar").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{train}/00000.tar\n{tmp_path}/dir.tar\n{train}/00001.tar\n")
    proc = run_encode(dvae_checkpoint, tmp_path / "b", "--shards", str(listing), "--val-shards", "", nproc=2,
                      ok=False)  # fmt: skip
    assert "IsADirectoryError" in proc.stdout + proc.stderr and "1 of 2 ranks failed" in proc.stderr
    assert not (tmp_path / "b" / MANIFEST).exists()
    assert sorted(p.name for p in (tmp_path / "b" / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
