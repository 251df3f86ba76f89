import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, eval_tokens, train_tokens
from megadalle.data.shards import read_manifest, split_urls, verify_shards
from megadalle.engine.checkpoint import load_eval_weights
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
