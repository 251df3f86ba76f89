"""A user's img2dataset download as training and evaluation data, without a megadalle manifest (issue 28): the
shards named by a folder, a brace pattern, a .txt list of URLs, local and on a real S3 server (SeaweedFS); each
planted fault skipped and counted by reason, a cut tar's losses counted from its `_stats.json` (and said to be
uncountable, once, without one); the tokenizer's captions; a dVAE trained 20 updates from the set."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, data_splits, eval_images, split_source, train_images
from megadalle.data.s3 import S3Settings, client, list_shards
from megadalle.data.shards import is_shard_set, shard_records
from tests.conftest import REPO, python
from tests.data.img2dataset import CUT, FAULTS, MAX_ASPECT, MIN_SIDE, PER_SHARD, SHARDS, VAL


def epoch(data: Data) -> tuple[int, SkipCounter]:
    """(images delivered, skips) of one epoch over data's train split, on one reader."""
    stream = train_images(data, 32, 4, 0, 1, SkipCounter(), world=1)
    stream.max_epochs = 1
    images = 0
    for x, captions in stream:
        assert x.shape[1:] == (3, 32, 32) and len(captions) == len(x)
        images += len(x)
    return images, stream.skips


def lost_of_cut(skips: SkipCounter) -> int:
    """Samples the cut shard lost, under its corrupt-tar reason."""
    [(url, reasons)] = [(u, r) for u, r in skips.shards.items() if u.endswith(CUT)]
    return sum(n for why, n in reasons.items() if why.startswith(("corrupt tar", "tar ended early")))


def test_sources_name_the_same_shards(img2dataset_shards, tmp_path):
    train, val = img2dataset_shards
    folder = [url for url, _ in shard_records(str(train), "train")]
    assert [Path(u).name for u in folder] == [f"{i:05d}.tar" for i in range(SHARDS)]
    assert not is_shard_set(str(train)) and list_shards(f"{train}/{{00000..{SHARDS - 1:05d}}}.tar") == folder
    shutil.copytree(train, tmp_path / "set" / "train")
    listing = tmp_path / "set" / "shards.txt"  # relative lines: relative to the list's folder
    listing.write_text("# my shards\n\n" + "".join(f"train/{Path(u).name}\n" for u in folder))
    assert list_shards(str(listing)) == [str(tmp_path / "set" / "train" / Path(u).name) for u in folder]
    assert list_shards(folder[0]) == [folder[0]]
    with pytest.raises(FileNotFoundError, match="neither a shard set"):
        shard_records(str(tmp_path / "empty"), "train")
    (tmp_path / "bad.txt").write_text("00000.tar\nnot-a-shard.zip\n")
    with pytest.raises(ValueError, match="bad.txt, line 2: 'not-a-shard.zip' is not a .tar shard"):
        list_shards(str(tmp_path / "bad.txt"))
    # the splits: a source without a manifest is the train split; val needs data.val_shards; no zeroshot
    alone = Data(shards=str(train))
    assert data_splits(alone) == ["train"] and split_source(alone, "zeroshot") is None
    with pytest.raises(ValueError, match="name the validation shards in data.val_shards"):
        split_source(alone, "val")
    both = Data(shards=str(train), val_shards=str(val))
    assert data_splits(both) == ["train", "val"] and split_source(both, "val") == str(val)
    with pytest.raises(ValueError, match="verify_sha256: .* has no manifest with checksums"):
        train_images(Data(shards=str(train), verify_sha256=True), 32, 4, 0, 1, SkipCounter(), world=1)


def test_an_epoch_counts_every_fault_by_reason(img2dataset_shards, tmp_path, caplog):
    train, val = img2dataset_shards
    data = Data(shards=str(train), val_shards=str(val), shuffle_buffer=8, min_image_side=MIN_SIDE,
                max_aspect_ratio=MAX_ASPECT, image_keys="jpg;jpeg;png;webp")  # fmt: skip
    images, skips = epoch(data)
    lost = lost_of_cut(skips)
    assert 0 < lost < PER_SHARD, "the cut shard lost part of its samples, counted from its _stats.json"
    assert {k: v for k, v in skips.by_reason().items() if "tar" not in k} == FAULTS
    assert images + skips.total == SHARDS * PER_SHARD, "every sample img2dataset wrote is delivered or counted"
    # the same, read from a .txt list naming the shards
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(train / f"{i:05d}.tar") for i in range(SHARDS)) + "\n")
    assert epoch(Data(**{**data.__dict__, "shards": str(listing)}))[1].by_reason() == skips.by_reason()
    # evaluation reads val (all of it: the filters are for training), the tokenizer's captions both splits
    got = sum(len(c) for _, c, _ in eval_images(data, "val", 32, 5))
    assert got == VAL
    from megadalle.data.loader import captions

    texts = captions(data)
    assert len(texts) == SHARDS * PER_SHARD - lost + VAL, "the caption of every sample the tars hold"
    # without _stats.json the cut shard's losses cannot be counted: said once, its failure counted once
    bare = tmp_path / "bare"
    shutil.copytree(train, bare)
    for stats in bare.glob("*_stats.json"):
        stats.unlink()
    with caplog.at_level(logging.WARNING, logger="megadalle.data.stream"):
        images2, skips2 = epoch(Data(**{**data.__dict__, "shards": str(bare)}))
    said = [r.message for r in caplog.records if "cannot be counted" in r.message]
    assert len(said) == 1 and "no _stats.json" in said[0]
    assert images2 == images and lost_of_cut(skips2) == 1


@pytest.mark.distributed  # the S3 server process
def test_the_set_on_s3_reads_as_it_does_locally(img2dataset_shards, s3_server, tmp_path):
    from tests.s3server import BUCKET

    train, val = img2dataset_shards
    c = client(S3Settings())
    for folder in (train, val):
        for path in sorted(folder.iterdir()):
            c.upload_file(str(path), BUCKET, f"cc3m/{folder.name}/{path.name}")
    c.put_object(Bucket=BUCKET, Key="cc3m/val.txt", Body=b"val/00000.tar\n")
    local = Data(shards=str(train), val_shards=str(val), shuffle_buffer=8, min_image_side=MIN_SIDE,
                 max_aspect_ratio=MAX_ASPECT)  # fmt: skip
    remote = Data(**{**local.__dict__, "shards": f"s3://{BUCKET}/cc3m/train/{{00000..{SHARDS - 1:05d}}}.tar",
                     "val_shards": f"s3://{BUCKET}/cc3m/val.txt"})  # fmt: skip
    assert not is_shard_set(f"s3://{BUCKET}/cc3m/train/", S3Settings())
    c.upload_file(str(train / "00000.tar"), BUCKET, "cc3m/train/nested/00000.tar")  # below the prefix: not listed
    assert list_shards(f"s3://{BUCKET}/cc3m/train") == [f"s3://{BUCKET}/cc3m/train/{i:05d}.tar" for i in range(SHARDS)]
    n_local, skips_local = epoch(local)
    n_remote, skips_remote = epoch(remote)
    assert n_remote == n_local and skips_remote.by_reason() == skips_local.by_reason()
    assert lost_of_cut(skips_remote) > 0, "the cut shard's _stats.json was read from the server"
    a = np.concatenate([x.numpy() for x, _, _ in eval_images(local, "val", 32, 8)])
    b = np.concatenate([x.numpy() for x, _, _ in eval_images(remote, "val", 32, 8)])
    assert a.shape == (VAL, 3, 32, 32) and np.array_equal(a, b)


@pytest.mark.slow
def test_a_dvae_trains_20_updates_from_img2dataset_shards(img2dataset_shards, tmp_path):
    train, val = img2dataset_shards
    proc = subprocess.run([python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
                           f"--data.shards={train}", f"--data.val_shards={val}", f"--job.run_root={tmp_path}",
                           "--train.steps=20", "--train.eval_every=20", f"--data.min_image_side={MIN_SIDE}",
                           f"--data.max_aspect_ratio={MAX_ASPECT}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "dvae_debug" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert all(np.isfinite(m["loss"]) for m in steps)
    assert steps[-1]["skipped_samples"] >= sum(FAULTS.values()), "an epoch's faults are counted"
    [ev] = [m for m in lines if m["kind"] == "eval"]
    assert ev["step"] == 20 and np.isfinite(ev["psnr_db"])


@pytest.mark.slow
def test_the_reranker_and_the_prior_on_the_fly_train_from_it(img2dataset_shards, tokenizer_model, dvae_checkpoint,
                                                              tmp_path):  # fmt: skip
    train, val = img2dataset_shards
    data = [f"--data.shards={train}", f"--data.val_shards={val}", f"--tokenizer.model_path={tokenizer_model}",
            f"--job.run_root={tmp_path}", "--train.steps=3", "--train.eval_every=3"]  # fmt: skip
    for config, extra, metric in (
        ("clip_debug", [], "val_i2t_r1"),
        ("prior_debug", [f"--model.dvae_checkpoint={dvae_checkpoint}"], "val_image_loss"),
    ):
        proc = subprocess.run([python(), "megadalle/train.py", "--config", f"megadalle/configs/{config}.toml",
                               *data, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / config / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3]
        [ev] = [m for m in lines if m["kind"] == "eval"]
        assert np.isfinite(ev[metric]) and not any(k.startswith("zeroshot") for k in ev), "no zero-shot split here"


def test_evaluation_reads_past_a_cut_tar_and_takes_the_caption_key(img2dataset_shards, tmp_path, caplog):
    import webdataset as wds

    from megadalle.data.s3 import samples

    _, val = img2dataset_shards
    rows = [{"__key__": s["__key__"], "jpg" if "jpg" in s else next(k for k in s if k in ("webp", "png")):
             s.get("jpg") or s.get("webp") or s["png"], "caption": s["txt"]}
            for s in samples([str(val / "00000.tar")])]  # fmt: skip
    folder = tmp_path / "val"
    folder.mkdir()
    for i, part in enumerate((rows[:8], rows[8:])):
        with wds.TarWriter(str(folder / f"{i:05d}.tar")) as tar:
            for row in part:
                tar.write(row)
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"successes": len(part)}))
    cut = folder / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    data = Data(shards=str(folder), val_shards=str(folder), caption_key="caption", image_keys="jpg;webp;png")
    with caplog.at_level(logging.WARNING, logger="megadalle.data.loader"):
        got = [c for _, captions, _ in eval_images(data, "val", 32, 3) for c in captions]
    assert 8 < len(got) < VAL and all(isinstance(c, str) and c for c in got), "read past the cut, captions read"
    [said] = [r.message for r in caplog.records if "skipped" in r.message]
    assert f"skipped {VAL - len(got)} samples" in said and "tar" in said, said
