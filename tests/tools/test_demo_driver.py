"""tools/demo.py's skip logic on fabricated outputs (no training), and tools/plot_curves.py on fabricated metrics."""

import argparse
import json
import os
import time

import pytest
import torch
from demo import Demo, ds_world_size, run_verdict, same_checkpoint, shard_set_problem
from PIL import Image
from plot_curves import main as plot_main
from plot_curves import read_metrics

from megadalle.config import load_config, write_resolved
from megadalle.data.shards import FORMAT, MANIFEST
from megadalle.engine.checkpoint import EXTRA, MARKER, save_atomic, tag_of, write_marker
from megadalle.engine.ds_config import load_ds_config
from tests.conftest import REPO

pytestmark = pytest.mark.slow

CONFIGS = REPO / "megadalle" / "configs"


def fake_shards(root, sizes=(3, 5), **settings):
    """A shard set as make_shards leaves it: shard files and a manifest recording their sizes."""
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, n in enumerate(sizes):
        (root / "train").mkdir(exist_ok=True)
        (root / "train" / f"train-{i:06d}.tar").write_bytes(b"x" * n)
        recs.append({"path": f"train/train-{i:06d}.tar", "samples": 1, "bytes": n, "sha256": ""})
    manifest = {"format": FORMAT, "samples": len(sizes), "splits": {"train": {"samples": len(sizes), "shards": recs}}}
    (root / MANIFEST).write_text(json.dumps(manifest | settings))
    return root


def fake_checkpoint(run_dir, step, complete=True):
    folder = run_dir / "checkpoints" / tag_of(step)
    folder.mkdir(parents=True)
    save_atomic({"step": step, "weights": {"w": torch.zeros(2)}, "config": ""}, folder / EXTRA)
    if complete:
        write_marker(folder, step, world_size=1)
    return folder


def fake_run(cfg):
    """A run folder as train.py starts it: the resolved config and the filled DeepSpeed config."""
    write_resolved(cfg, cfg.run_dir)
    (cfg.run_dir / "ds_config.json").write_text(json.dumps(load_ds_config(cfg, 1)))


def test_shard_set_problem(tmp_path):
    assert "no " in shard_set_problem(tmp_path / "none")
    root = fake_shards(tmp_path / "shards")
    assert shard_set_problem(root) is None
    (root / "train" / "train-000001.tar").write_bytes(b"x" * 4)  # truncated
    assert "has 4 bytes" in shard_set_problem(root) and "says 5" in shard_set_problem(root)
    (root / "train" / "train-000001.tar").unlink()
    assert "is missing" in shard_set_problem(root)
    (root / MANIFEST).write_text("{not json")
    assert "malformed" in shard_set_problem(root)


def test_run_verdict(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # ds_configs/ is relative to the repository
    argv = ["--config", str(CONFIGS / "dvae_debug.toml"), f"--job.run_root={tmp_path}", "--train.steps=4"]
    cfg = load_config(argv)
    inputs = tmp_path / "manifest.json"
    inputs.write_text("{}")
    old = time.time() - 100
    os.utime(inputs, (old, old))

    verdict = run_verdict(cfg, [inputs])
    assert not verdict.skip and verdict.fresh and "no run" in verdict.why
    fake_run(cfg)
    fake_checkpoint(cfg.run_dir, 2)
    verdict = run_verdict(cfg, [inputs])  # stopped before the final step: resume it
    assert not verdict.skip and not verdict.fresh and "train.steps=4" in verdict.why
    final = fake_checkpoint(cfg.run_dir, 4)
    assert run_verdict(cfg, [inputs]).skip
    # the console and how a run was started do not count; anything else does
    assert run_verdict(load_config([*argv, "--logging.progress=on", "--checkpoint.resume=none"]), [inputs]).skip
    verdict = run_verdict(load_config([*argv, "--optim.lr=0.5"]), [inputs])
    assert not verdict.skip and verdict.fresh and "optim.lr" in verdict.why
    verdict = run_verdict(load_config([*argv, "--train.steps=6"]), [inputs])
    assert not verdict.skip and verdict.fresh and "train.steps 4 -> 6" in verdict.why
    # a DeepSpeed JSON that fills differently now
    ds = json.loads((cfg.run_dir / "ds_config.json").read_text())
    (cfg.run_dir / "ds_config.json").write_text(json.dumps(ds | {"steps_per_print": 12345}))
    assert "ds_config.json differs" in run_verdict(cfg, [inputs]).why
    fake_run(cfg)
    # a corrupt final checkpoint
    (final / EXTRA).write_bytes(b"truncated")
    verdict = run_verdict(cfg, [inputs])
    assert not verdict.skip and "marker says" in verdict.why
    (final / MARKER).unlink()
    assert "missing COMPLETE marker" in run_verdict(cfg, [inputs]).why
    write_marker(final, 4, world_size=1)
    assert run_verdict(cfg, [inputs]).skip
    # an input written after the run started: start over
    inputs.write_text("{}")
    verdict = run_verdict(cfg, [inputs])
    assert not verdict.skip and verdict.fresh and "written after the run started" in verdict.why


def test_ds_world_size():
    assert ds_world_size({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                          "train_batch_size": 16}) == 2  # fmt: skip
    assert ds_world_size({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                          "train_batch_size": 4}) == 1  # fmt: skip
    assert ds_world_size({}) == 1 and ds_world_size({"train_micro_batch_size_per_gpu": 0}) == 1


def test_same_checkpoint(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 2)
    four = fake_checkpoint(run, 4)
    fake_checkpoint(run, 6, complete=False)
    assert same_checkpoint(str(four), four)
    assert same_checkpoint(str(run / "checkpoints"), four)  # the newest complete one
    assert not same_checkpoint(str(run / "checkpoints" / tag_of(2)), four)
    assert not same_checkpoint(str(tmp_path / "elsewhere"), four)


def demo_args(**kw):
    names = {"demo_config": "demo", "dvae_config": "dvae_small", "prior_config": "prior_small",
             "clip_config": "clip_small"}  # fmt: skip
    args = {k: str(CONFIGS / f"{v}.toml") for k, v in names.items()}
    return argparse.Namespace(**(args | {"quick": False, "progress": "off"} | kw))


def stage_lines(out):
    """{stage: "skipped: ..." or "would run (...)"} from a dry run's output."""
    lines = {}
    for line in out.splitlines():
        if line.startswith("demo: ["):
            name, rest = line.split("] ", 1)[1].split(": ", 1)
            lines[name] = rest
    return lines


def test_dry_run_skips_and_reruns_downstream(tmp_path, monkeypatch, capsys):
    """Paths in the configs are relative: in tmp_path, the demo's outputs are fabricated there."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["--config", str(CONFIGS / "demo.toml")])
    d = cfg.data
    settings = {"image_size": d.image_size, "sources": d.sources, "style_in_caption": d.style_in_caption,
                "val_percent": d.val_percent, "zeroshot_percent": d.zeroshot_percent, "seed": cfg.job.seed}  # fmt: skip
    shards = fake_shards(tmp_path / cfg.data.shards, **settings)

    Demo(demo_args()).run(force=False, dry_run=True)
    lines = stage_lines(capsys.readouterr().out)
    assert list(lines) == ["shards", "tokenizer", "dvae", "tokens", "prior", "clip", "samples", "report", "curves"]
    assert lines["shards"].startswith("skipped:") and "every shard there with its size" in lines["shards"]
    assert lines["tokenizer"].startswith("would run (no ") and lines["dvae"].startswith("would run (no run in")
    assert "tokenizer rebuilt in this run" in lines["prior"] and "rebuilt in this run" in lines["curves"]

    (shards / "train" / "train-000000.tar").write_bytes(b"xx")  # damaged: rebuild it and everything after it
    Demo(demo_args()).run(force=False, dry_run=True)
    lines = stage_lines(capsys.readouterr().out)
    assert lines["shards"].startswith("would run (") and "has 2 bytes" in lines["shards"]
    assert all("rebuilt in this run" in lines[s] for s in list(lines)[1:])

    fake_shards(shards, image_size=d.image_size + 1, **{k: v for k, v in settings.items() if k != "image_size"})
    Demo(demo_args()).run(force=False, dry_run=True)
    assert "image_size" in stage_lines(capsys.readouterr().out)["shards"]

    fake_shards(shards, limit_per_source=300, **settings)  # a subset (the quick demo's): not the full set
    Demo(demo_args()).run(force=False, dry_run=True)
    assert "limit_per_source 300 -> 0" in stage_lines(capsys.readouterr().out)["shards"]

    fake_shards(shards, **settings)
    Demo(demo_args()).run(force=True, dry_run=True)
    out = capsys.readouterr().out
    assert all(v.startswith("would run (--force)") for v in stage_lines(out).values())
    assert "--checkpoint.resume=none --checkpoint.overwrite=true" in out  # training runs start over


def test_quick_writes_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = Demo(demo_args(quick=True))
    full = load_config(["--config", str(CONFIGS / "demo.toml")])
    assert str(demo.shards) != full.data.shards and str(demo.tokenizer) != full.tokenizer.model_path
    for kind, cfg in demo.cfgs.items():
        assert cfg.job.name.endswith("_quick") and cfg.train.steps <= 20, kind
        assert cfg.train.eval_every == cfg.train.steps  # one evaluation, at the end: the dVAE's grid
        for path in (cfg.data.shards, cfg.tokenizer.model_path, cfg.prior.tokens):
            assert not path.startswith(str(demo._full_root) + "/"), (kind, path)
    Demo(demo_args(quick=True)).run(force=False, dry_run=True)
    out = capsys.readouterr().out
    assert "_quick" in out and f"{demo._full_root}/" not in out  # nothing read or written in the full folder


def test_plot_curves_writes_a_png(tmp_path):
    runs = []
    for name, train_extra, evals in (
        ("dvae_small", {"batch_codes_used_fraction": 0.1}, {"codebook_used_fraction": 0.05, "codebook_perplexity": 4.0,
                                                       "psnr_db": 12.0}),
        ("prior_small", {}, {"val_loss": 2.0, "zeroshot_loss": 2.2, "val_text_loss": 3.0}),
        ("clip_small", {}, {"val_i2t_r1": 0.03}),
    ):  # fmt: skip
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({"kind": "train", "step": s, "loss": 5 / s, **train_extra}) for s in range(1, 31)]
        lines += [json.dumps({"kind": "eval", "step": s, **evals}) for s in (15, 30)]
        lines += ['{"kind": "train", "step": 31, "loss": "nan"}', "{truncated"]  # a non-finite loss, a cut line
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(str(run))
    m = read_metrics(tmp_path / "dvae_small" / "metrics.jsonl")
    assert len(m["train"]) == 31 and sorted(m["eval"]) == [15, 30]
    out = tmp_path / "plots" / "curves.png"
    assert plot_main([*runs, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400
    assert plot_main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_quick_demo_end_to_end(tmp_path):
    """`tools/demo.py --quick` for real, into the repository's outputs/demo_quick/ and *_quick runs (where
    `make demo QUICK=1` writes; the driver works from the repository, and they are removed first so that nothing
    is moved aside and piles up): every stage runs, report.json holds every figure of issue 9 as a finite number
    (the targets are the full demo's, not asserted here), the PNGs are written, and a second run skips every
    stage."""
    import shutil
    import subprocess
    import sys

    from demo_report import bad_figures

    quick = Demo(demo_args(quick=True))
    for folder in [quick.root, *(c.run_dir for c in quick.cfgs.values())]:
        assert folder.name.endswith("_quick"), folder  # never the full demo's outputs
        shutil.rmtree(REPO / folder, ignore_errors=True)

    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--quick", "--progress", "off"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the default configs, from another working directory
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = REPO / "outputs" / "demo_quick"
    rep = json.loads((root / "report.json").read_text())
    assert not bad_figures(rep), bad_figures(rep)
    for png in (root / "samples" / "samples.png", root / "curves.png"):
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100, png
    assert "caption_following_x_chance" in proc.stdout and "wall time" in proc.stdout
    assert "Warning" not in proc.stderr and "Setting accelerator" not in proc.stdout + proc.stderr

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(stage_lines(again.stdout)) == 9 and all(
        v.startswith("skipped") for v in stage_lines(again.stdout).values()
    )
