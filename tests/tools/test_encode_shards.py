import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

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
