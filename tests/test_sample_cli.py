"""End to end: train.py checkpoints of the three models -> sample.py -> PNG and scores; evaluate.py. And fast:
fabricated checkpoints of fresh debug models -> sample() / sample.py on a chosen device."""

import json

import pytest
import torch
from PIL import Image

from megadalle.sample import load_models, main, rerank, sample
from tests.conftest import _run, python
from tests.tiny_checkpoints import tiny_run


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


@pytest.mark.slow
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
        assert im.size[0] >= 2 * 96 and im.size[1] == 2 * (96 + 14)  # 32 px images shown 3x
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


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_run(tmp_path_factory.mktemp("tiny"))


def _cli(tiny: dict, out, *extra: str) -> int:
    return main(["--prior", str(tiny["prior"]), "--dvae", str(tiny["dvae"]), "--clip", str(tiny["clip"]),
                 "--captions", "red heart in twemoji style", "blue car", "--candidates", "3", "--keep", "2",
                 "--batch", "2", "--out", str(out), *extra])  # fmt: skip


def test_sample_on_cpu_returns_cpu_tensors(tiny):
    models = load_models(tiny["prior"], tiny["dvae"], tiny["clip"], device="cpu")
    assert models.device == torch.device("cpu")
    results = sample(models, ["red heart in twemoji style"], 3, 2, seed=1, batch=2, progress=False)
    r = results[0]
    assert r["images"].shape == (3, 3, 32, 32) and r["codes"].shape == (3, 64) and r["scores"].shape == (3,)
    assert all(t.device.type == "cpu" for t in (r["images"], r["codes"], r["scores"]))
    assert int(r["codes"].max()) < 256 and r["kept"] == rerank(r["scores"], 2)
    again = sample(models, ["red heart in twemoji style"], 3, 2, seed=1, batch=2, progress=False)[0]
    assert torch.equal(again["codes"], r["codes"]), "the seed fixes the draw"


def test_sample_cli_device_cpu(tiny, tmp_path):
    assert _cli(tiny, tmp_path / "out", "--device", "cpu", "--top-k", "20") == 0
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["device"] == "cpu" and [len(c["scores"]) for c in report["captions"]] == [3, 3]
    with Image.open(tmp_path / "out" / "samples.png") as im:
        assert im.size[1] == 2 * (96 + 14)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "prompt.png")  # image-to-image on the device
    rc = _cli(tiny, tmp_path / "i2i", "--device", "cpu", "--image-prompt", str(tmp_path / "prompt.png"),
              "--prompt-rows", "3")  # fmt: skip
    assert rc == 0 and (tmp_path / "i2i" / "samples.png").is_file()


def test_sample_cli_rejects_cuda_without_gpu(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert _cli(tiny, tmp_path / "out", "--device", "cuda") == 2
    assert "device 'cuda' was asked but no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_sample_on_cuda_equals_cpu_greedy(tiny):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on = {d: load_models(tiny["prior"], tiny["dvae"], tiny["clip"], device=d) for d in ("cpu", "cuda")}
    for m in (on["cuda"].prior, on["cuda"].dvae, on["cuda"].clip):
        assert all(t.device.type == "cuda" for t in [*m.parameters(), *m.buffers()])
    for models in on.values():  # wider logit gaps, so that the argmax does not hinge on float rounding
        models.prior.image_head.weight.mul_(20)
    captions = ["red heart in twemoji style", "blue car"]
    prefix = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))
    cpu, gpu = (sample(on[d], captions, 4, 2, temperature=0.0, batch=3, prefix=prefix, progress=False) for d in on)
    for a, b in zip(cpu, gpu):
        assert b["codes"].device.type == "cpu" and b["images"].device.type == "cpu"
        assert torch.equal(a["codes"], b["codes"]) and torch.equal(b["codes"][:, :16], prefix.expand(4, -1))
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=1e-2)  # cuDNN convs may use TF32
    drawn = sample(on["cuda"], captions, 4, 2, temperature=1.0, top_k=20, seed=3, progress=False)  # cuda generator
    again = sample(on["cuda"], captions, 4, 2, temperature=1.0, top_k=20, seed=3, progress=False)
    assert all(torch.equal(x["codes"], y["codes"]) for x, y in zip(drawn, again))


@pytest.mark.slow
def test_demo_report_computes_every_figure(checkpoints, tmp_path, emoji_shards):
    """tools/demo_report.py on train.py checkpoints: every figure the demo's targets name is computed and finite
    (the targets themselves are the demo's, not asserted here)."""
    from demo_report import bad_figures

    out = tmp_path / "report.json"
    proc = _run([python(), "tools/demo_report.py", "--prior", str(checkpoints["prior"]), "--dvae",
                 str(checkpoints["dvae"]), "--clip", str(checkpoints["clip"]), "--shards", str(emoji_shards),
                 "--captions", "4", "--per-caption", "2", "--images", "16", "--kmeans-images", "16",
                 "--out", str(out)])  # fmt: skip
    assert "caption following" in proc.stdout
    rep = json.loads(out.read_text())
    assert not bad_figures(rep), bad_figures(rep)
    d, p = rep["dvae"], rep["prior"]
    assert 0 < d["codes_used_fraction"] <= 1 and d["content_perplexity"] >= 1 and 0 <= d["mean_rgb_mae"] <= 1
    assert 0 <= p["caption_following_x_chance"] <= p["captions"] == 4 and p["per_caption"] == 2
    assert rep["val_images"] == 16 and p["fid_floor"] >= 0 and p["fid_ceiling"] >= 0
