"""End to end: train.py checkpoints of the three models -> sample.py -> PNG and scores; evaluate.py."""

import json

import pytest
import torch
from PIL import Image

from megadalle.sample import rerank
from tests.conftest import _run, python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(token_shards, emoji_shards, tokenizer_model, dvae_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = [f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={root}", "--train.eval_every=0"]
    _run([python(), "megadalle/train.py", "--config", "megadalle/configs/prior_debug.toml",
          f"--prior.tokens={token_shards}", "--train.steps=2", "--parallel.deepspeed_config=ds_configs/zero0_cpu.json",
          *tok])  # fmt: skip
    _run([python(), "megadalle/train.py", "--config", "megadalle/configs/clip_debug.toml",
          f"--data.shards={emoji_shards}", "--train.steps=2", "--train.micro_batch_size=8", *tok])  # fmt: skip
    return {"prior": root / "prior_debug" / "checkpoints", "dvae": dvae_checkpoint,
            "clip": root / "clip_debug" / "checkpoints"}  # fmt: skip


def test_rerank_picks_the_highest_scores():
    assert rerank(torch.tensor([0.1, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]


def test_sample_cli_writes_png_and_scores(checkpoints, tmp_path, emoji_shards):
    from megadalle.data.shards import split_urls

    out = tmp_path / "samples"
    proc = _run([python(), "megadalle/sample.py", "--prior", str(checkpoints["prior"]), "--dvae",
                 str(checkpoints["dvae"]), "--clip", str(checkpoints["clip"]), "--captions",
                 "red heart in twemoji style", "woman mechanic, dark skin tone in openmoji style",
                 "--candidates", "5", "--keep", "2", "--batch", "3", "--top-k", "50", "--out", str(out)])  # fmt: skip
    assert "sampled 2 captions x 5 candidates" in proc.stdout
    with Image.open(out / "samples.png") as im:
        im.verify()
    with Image.open(out / "samples.png") as im:
        assert im.size[0] >= 2 * 32 and im.size[1] == 2 * (32 + 14)
    report = json.loads((out / "scores.json").read_text())
    for entry in report["captions"]:
        scores = entry["scores"]
        assert len(scores) == 5 and len(entry["kept"]) == 2
        assert [scores[i] for i in entry["kept"]] == sorted(scores, reverse=True)[:2]
    # image-to-image: an image's first rows as the prompt
    shard = split_urls(emoji_shards, "val")[0]
    import webdataset as wds

    sample = next(iter(wds.WebDataset([shard], shardshuffle=False, empty_check=False)))
    (tmp_path / "prompt.png").write_bytes(sample["png"])
    proc = _run([python(), "megadalle/sample.py", "--prior", str(checkpoints["prior"]), "--dvae",
                 str(checkpoints["dvae"]), "--captions", sample["txt"].decode(), "--candidates", "2", "--keep", "1",
                 "--image-prompt", str(tmp_path / "prompt.png"), "--prompt-rows", "3",
                 "--out", str(tmp_path / "i2i")])  # fmt: skip
    assert (tmp_path / "i2i" / "samples.png").is_file()


def test_evaluate_tool_end_to_end(checkpoints, emoji_shards, tmp_path):
    out = tmp_path / "eval"
    proc = _run([python(), "tools/evaluate.py", "--prior", str(checkpoints["prior"]), "--dvae",
                 str(checkpoints["dvae"]), "--clip", str(checkpoints["clip"]), "--shards", str(emoji_shards),
                 "--captions", "4", "--rerank", "1,2,4", "--blur", "0,2", "--out", str(out)], timeout=900)  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    assert set(report["splits"]) == {"val", "zeroshot"}
    for e in report["splits"].values():
        assert set(e["by_rerank"]) == {"1", "2", "4"} and set(e["by_blur"]) == {"0.0", "2.0"}
        assert all(v["fid"] > 0 and v["inception_score"] >= 1 for v in e["by_rerank"].values())
        clip = [e["by_rerank"][n]["clip_score"] for n in ("1", "2", "4")]
        assert clip == sorted(clip), "the best of more candidates scores at least as high"
    assert (out / "eval.png").is_file() and "zeroshot" in proc.stdout
