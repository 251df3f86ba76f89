#!/usr/bin/env python
"""The demo driver behind `make demo`: every stage of the demo as a subprocess, in order, each skipped when its
outputs are complete, valid and newer than its inputs.

    python tools/demo.py [--quick] [--force] [--dry-run] [--progress auto|on|off]
        [--demo-config megadalle/configs/demo.toml] [--dvae-config ...] [--prior-config ...] [--clip-config ...]

Stages (outputs under the demo folder, the parent of the demo config's data.shards, e.g. outputs/demo/):
  shards     tools/make_shards.py       skipped when manifest.json lists shard files that all have its sizes, made
                                        with the demo config's image size, sources, splits and seed
  tokenizer  tools/train_tokenizer.py   skipped when the model file is there with tokenizer.vocab_size pieces
  dvae       megadalle/train.py         skipped when the run holds a COMPLETE checkpoint at the config's final
  prior                                 train.steps and its resolved config.toml (and ds_config.json) equal what
  clip                                  would run now; a run stopped early resumes; a changed config, or inputs
                                        rebuilt since the run started, start it over (earlier output moved aside)
  tokens     tools/encode_shards.py     skipped when manifest.json's shards are all there with their sizes and it
                                        records the final dVAE checkpoint
  samples    megadalle/sample.py        skipped when samples.png and scores.json are there, newer than the models,
                                        and scores.json records the same checkpoints, captions and counts
  report     tools/demo_report.py       skipped when report.json is newer than the models and the shards
  curves     tools/plot_curves.py       skipped when curves.png is newer than the runs' metrics.jsonl
Any stage also reruns when an output of a stage it reads is newer than its own, or was rebuilt in this run.

--quick: a smoke run of the same stages in a few minutes on a 2-core CPU: a few hundred images, a small
tokenizer, QUICK_STEPS updates per model (the schedules' lengths scaled with the run's), fewer captions and
candidates, a report on fewer images. It writes under `<demo folder>_quick/` (outputs/demo_quick/) and into runs
named `<job.name>_quick`, so quick and full outputs never mix. --force reruns every stage (runs start over);
--dry-run says what each stage would do and why. --progress: the training runs' progress bars (logging.progress),
by default on when this driver's stderr, which the stages inherit, is a terminal.
At the end: where the images and the report are, the report's figures and each stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megadalle.config import ConfigError, JobConfig, apply_toml_text, load_config
from megadalle.data.shards import MANIFEST, read_manifest, verify_shards
from megadalle.engine.checkpoint import find_resume, incomplete_reason, is_step_folder, tag_of
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.progress import progress_enabled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_report import bad_figures  # noqa: E402  (a sibling script, not a package module)

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = "megadalle/configs/demo_captions.txt"
AUGMENTATIONS = 4
"""Views per training image in the prior's token shards (central + Listing 2 crops)."""
SAMPLE_ARGS = {"candidates": 8, "keep": 4}
REPORT_ARGS: list[str] = []  # demo_report.py's defaults: 512 val images, 64 captions x 8 samples

QUICK_SUFFIX = "_quick"
QUICK_STEPS = 20
"""Updates per model in --quick (at most the config's train.steps)."""
QUICK_LIMIT_PER_SOURCE = 300
"""Images of each emoji source in --quick (about 500 train, 70 val, 40 zeroshot)."""
QUICK_VOCAB = 256
"""BPE pieces in --quick: a few hundred captions support no more."""
QUICK_SAMPLE_ARGS = {"candidates": 4, "keep": 2}
QUICK_REPORT_ARGS = ["--images", "64", "--captions", "8", "--per-caption", "2", "--kmeans-images", "200"]
SCHEDULE_FIELDS = (
    "dvae.warm_start_steps",
    "dvae.kl_warmup_steps",
    "dvae.tau_steps",
    "dvae.lr_decay_steps",
    "prior.lr_decay_steps",
    "optim.warmup_steps",
    "optim.plateau_patience",
)
"""Lengths in updates that --quick scales by QUICK_STEPS / train.steps (and the EMA's horizon with them), so
that a quick run goes through the same schedules as the full one."""
IGNORED_FIELDS = {("logging", "progress"), ("logging", "level"), ("checkpoint", "resume"), ("checkpoint", "overwrite")}
"""Resolved-config fields that do not change what a run computes: the console, and how the run was started (the
driver starts runs over with resume=none, overwrite=true)."""
TRAINED = ("dvae", "prior", "clip")


@dataclass
class Verdict:
    skip: bool
    why: str
    fresh: bool = False
    """Training runs: start over (checkpoint.resume=none, overwrite=true) rather than resume."""


@dataclass
class Stage:
    name: str
    deps: tuple[str, ...]
    """Stages whose outputs this one reads: rebuilt ones make it rerun."""
    check: Callable[[], Verdict]
    command: Callable[[bool], list[str]]
    stamp: Callable[[], Path]
    """The file whose modification time says when the output was finished."""
    inputs: Callable[[], list[Path]] | None = None
    """Files that must not be newer than the stamp (None: the stamps of `deps`)."""
    seconds: float = 0.0
    ran: bool = False


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def shard_set_problem(root: Path) -> str | None:
    """None when `root`/manifest.json exists and every shard it lists is there with its recorded size, else why
    not. (Sizes, not sha256: this check runs on every `make demo`.)"""
    path = root / MANIFEST
    if not path.is_file():
        return f"no {path}"
    try:
        verify_shards(root, checksums=False)
    except (FileNotFoundError, ValueError) as e:  # a missing or mis-sized shard, a malformed manifest
        return str(e)
    except (KeyError, TypeError, AttributeError) as e:
        return f"unreadable {path} ({type(e).__name__}: {e})"
    return None


def config_diff(path: Path, cfg: JobConfig) -> list[str]:
    """The fields (but IGNORED_FIELDS) in which the resolved config at `path` differs from `cfg`."""
    try:
        old = JobConfig()
        apply_toml_text(old, path.read_text(), str(path))
    except (OSError, ConfigError) as e:
        return [f"unreadable ({e})"]
    a, b = old.to_dict(), cfg.to_dict()
    return [
        f"{s}.{k} {a[s][k]!r} -> {b[s][k]!r}"
        for s in b
        for k in b[s]
        if (s, k) not in IGNORED_FIELDS and a[s][k] != b[s][k]
    ]


def ds_world_size(ds: dict) -> int:
    """The world size a filled DeepSpeed config was written for (train_batch_size = micro x accum x world), so a
    stage run by hand on 2 ranks is compared as such; 1 when the numbers do not say."""
    try:
        per_rank = int(ds["train_micro_batch_size_per_gpu"]) * int(ds["gradient_accumulation_steps"])
        world, rest = divmod(int(ds["train_batch_size"]), per_rank)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1
    return world if world >= 1 and rest == 0 else 1


def run_verdict(cfg: JobConfig, inputs: list[Path]) -> Verdict:
    """Whether the run of `cfg` is done (a COMPLETE checkpoint at train.steps, its resolved config equal to `cfg`,
    started after its `inputs` were written), and if not whether to resume it or start over."""
    run = cfg.run_dir
    resolved = run / "config.toml"
    if not resolved.is_file():
        return Verdict(False, f"no run in {run}", fresh=True)
    diff = config_diff(resolved, cfg)
    ds_path = run / "ds_config.json"
    try:
        saved = json.loads(ds_path.read_text())
        if saved != load_ds_config(cfg, ds_world_size(saved)):
            diff.append(f"{ds_path} differs from {cfg.parallel.deepspeed_config} filled from the config")
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        diff.append(f"{ds_path}: {type(e).__name__}: {e}")
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return Verdict(False, f"{resolved} differs from the config now: {'; '.join(diff[:3])}{more}", fresh=True)
    newer = [str(p) for p in inputs if p.is_file() and mtime(p) > mtime(resolved)]
    if newer:
        return Verdict(False, f"{', '.join(newer)} written after the run started", fresh=True)
    final = run / "checkpoints" / tag_of(cfg.train.steps)
    reason = incomplete_reason(final) if final.is_dir() else "not there"
    if reason is not None:
        return Verdict(False, f"no complete checkpoint at train.steps={cfg.train.steps} ({final}: {reason}); resuming")
    return Verdict(True, f"{final} is complete at train.steps={cfg.train.steps} and {resolved} matches")


def same_checkpoint(recorded: str, final: Path) -> bool:
    """Whether `recorded` (a checkpoint folder, or a run's checkpoints/ folder: its newest complete one) is `final`."""
    path = Path(recorded)
    if path.is_dir() and not is_step_folder(path):
        path = find_resume(path, "auto") or path
    return path.exists() and path.resolve() == final.resolve()


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.progress = "on" if progress_enabled(args.progress, 0) else "off"
        base = load_config(["--config", args.demo_config])
        full_root = Path(base.data.shards).parent
        self.root = full_root.with_name(full_root.name + QUICK_SUFFIX) if self.quick else full_root
        self._full_root = full_root
        demo_quick = [
            f"--data.shards={self.remap(base.data.shards)}",
            f"--tokenizer.model_path={self.remap(base.tokenizer.model_path)}",
            f"--tokenizer.vocab_size={min(QUICK_VOCAB, base.tokenizer.vocab_size)}",
            f"--data.limit_per_source={QUICK_LIMIT_PER_SOURCE}",
        ]
        self.demo_args = ["--config", args.demo_config, *(demo_quick if self.quick else [])]
        self.demo_cfg = load_config(self.demo_args)
        self.shards = Path(self.demo_cfg.data.shards)
        self.tokenizer = Path(self.demo_cfg.tokenizer.model_path)
        self.train_args: dict[str, list[str]] = {}
        self.cfgs: dict[str, JobConfig] = {}
        for kind, path in zip(TRAINED, (args.dvae_config, args.prior_config, args.clip_config)):
            cfg = load_config(["--config", path])
            extra = self.quick_overrides(cfg) if self.quick else []
            self.train_args[kind] = ["--config", path, *extra, f"--logging.progress={self.progress}"]
            self.cfgs[kind] = load_config(self.train_args[kind])
        self.tokens = Path(self.cfgs["prior"].prior.tokens)
        self.check_agreement()
        captions = [c.strip() for c in (REPO / CAPTIONS).read_text().splitlines() if c.strip()]
        # quick: two captions and the last (held-out) one
        self.captions = captions[:2] + captions[-1:] if self.quick else captions
        self.sample_args = QUICK_SAMPLE_ARGS if self.quick else SAMPLE_ARGS
        self.report_args = QUICK_REPORT_ARGS if self.quick else REPORT_ARGS

    def remap(self, path: str) -> str:
        """A path under the full demo folder moved under the quick one (others as they are)."""
        p = Path(path)
        try:
            return str(self.root / p.relative_to(self._full_root))
        except ValueError:
            return path

    def quick_overrides(self, cfg: JobConfig) -> list[str]:
        steps = min(QUICK_STEPS, cfg.train.steps)
        out = [f"--job.name={cfg.job.name}{QUICK_SUFFIX}", f"--train.steps={steps}", f"--train.eval_every={steps}",
               "--checkpoint.every=0", f"--train.log_every={max(1, steps // 4)}"]  # fmt: skip
        scale = steps / cfg.train.steps
        for name in SCHEDULE_FIELDS:
            section, key = name.split(".")
            value = getattr(getattr(cfg, section), key)
            if section in TRAINED and section != cfg.job.stage:
                continue  # another stage's section: unused by this run
            if value > 0 and (name != "optim.plateau_patience" or cfg.optim.schedule == "plateau"):
                out.append(f"--{name}={max(1, round(value * scale))}")
        if cfg.optim.ema_decay > 0:  # the EMA's horizon, 1 / (1 - decay) updates, scaled like the schedules
            # at least 0.5: a decay of 0 would switch the EMA off, and the smoke run would skip its code path
            out.append(f"--optim.ema_decay={max(0.5, 1 - (1 - cfg.optim.ema_decay) / scale):.6g}")
        # every path into the full demo folder redirected into the quick one
        for name in ("data.shards", "tokenizer.model_path", "prior.tokens"):
            section, key = name.split(".")
            value = getattr(getattr(cfg, section), key)
            if self.remap(value) != value:
                out.append(f"--{name}={self.remap(value)}")
        if self.remap(cfg.tokenizer.model_path) != cfg.tokenizer.model_path:  # the quick tokenizer's size
            out.append(f"--tokenizer.vocab_size={min(QUICK_VOCAB, cfg.tokenizer.vocab_size)}")
        return out

    def check_agreement(self) -> None:
        """The runs must read what the demo config builds; say which config disagrees."""
        wrong = [
            f"{kind} data.shards={self.cfgs[kind].data.shards}" for kind in ("dvae", "clip")
            if Path(self.cfgs[kind].data.shards) != self.shards
        ] + [
            f"{kind} tokenizer.model_path={self.cfgs[kind].tokenizer.model_path}" for kind in ("prior", "clip")
            if Path(self.cfgs[kind].tokenizer.model_path) != self.tokenizer
        ]  # fmt: skip
        if wrong:
            raise ConfigError(
                f"the run configs disagree with the demo config (data.shards={self.shards}, tokenizer.model_path="
                f"{self.tokenizer}): {', '.join(wrong)}"
            )

    def final(self, kind: str) -> Path:
        cfg = self.cfgs[kind]
        return cfg.run_dir / "checkpoints" / tag_of(cfg.train.steps)

    # --- the stages -------------------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        py = sys.executable
        samples, report, curves = self.root / "samples", self.root / "report.json", self.root / "curves.png"
        stamps = {
            "shards": lambda: self.shards / MANIFEST,
            "tokenizer": lambda: self.tokenizer,
            "tokens": lambda: self.tokens / MANIFEST,
        }
        stages = [
            Stage("shards", (), self.check_shards, lambda _: [py, "tools/make_shards.py", *self.demo_args],
                  stamps["shards"]),
            Stage("tokenizer", ("shards",), self.check_tokenizer,
                  lambda _: [py, "tools/train_tokenizer.py", *self.demo_args], stamps["tokenizer"]),
            self.train_stage("dvae", ("shards",), stamps),
            Stage("tokens", ("dvae", "shards"), self.check_tokens,
                  lambda _: [py, "tools/encode_shards.py", "--checkpoint", str(self.final("dvae")), "--shards",
                             str(self.shards), "--out", str(self.tokens), "--augmentations", str(AUGMENTATIONS)],
                  stamps["tokens"]),
            self.train_stage("prior", ("tokens", "tokenizer"), stamps),
            self.train_stage("clip", ("shards", "tokenizer"), stamps),
            Stage("samples", ("prior", "dvae", "clip", "tokenizer"), self.check_samples,
                  lambda _: [py, "megadalle/sample.py", *self.model_args(), *self.caption_args(),
                             *(f"--{k}={v}" for k, v in self.sample_args.items()), "--out", str(samples)],
                  lambda: samples / "samples.png"),
            Stage("report", ("prior", "dvae", "clip", "shards"), lambda: self.check_file(report, "json"),
                  lambda _: [py, "tools/demo_report.py", *self.model_args(), "--shards", str(self.shards),
                             *self.report_args, "--out", str(report)],
                  lambda: report),
            Stage("curves", ("dvae", "prior", "clip"), lambda: self.check_file(curves, "png"),
                  lambda _: [py, "tools/plot_curves.py", *(str(self.cfgs[k].run_dir) for k in TRAINED),
                             "--out", str(curves)],
                  lambda: curves,
                  inputs=lambda: [self.cfgs[k].run_dir / self.cfgs[k].logging.json_file for k in TRAINED]),
        ]  # fmt: skip
        return stages

    def train_stage(self, kind: str, deps: tuple[str, ...], stamps: dict[str, Callable[[], Path]]) -> Stage:
        """A training run; its check compares the inputs (the stamps of `deps`) with the run's start itself."""

        def command(fresh: bool) -> list[str]:
            start_over = ["--checkpoint.resume=none", "--checkpoint.overwrite=true"] if fresh else []
            return [sys.executable, "megadalle/train.py", *self.train_args[kind], *start_over]

        def check() -> Verdict:
            return run_verdict(self.cfgs[kind], [stamps[d]() for d in deps])

        return Stage(kind, deps, check, command, lambda: self.final(kind) / "COMPLETE", inputs=list)

    def model_args(self) -> list[str]:
        return [arg for kind in ("prior", "dvae", "clip") for arg in (f"--{kind}", str(self.final(kind)))]

    def caption_args(self) -> list[str]:
        return ["--captions", *self.captions] if self.quick else ["--captions-file", CAPTIONS]

    def check_shards(self) -> Verdict:
        problem = shard_set_problem(self.shards)
        if problem:
            return Verdict(False, problem)
        m, d = read_manifest(self.shards), self.demo_cfg.data
        want = {
            "image_size": d.image_size,
            "sources": d.sources,
            "limit_per_source": d.limit_per_source,
            "style_in_caption": d.style_in_caption,
            "val_percent": d.val_percent,
            "zeroshot_percent": d.zeroshot_percent,
            "seed": self.demo_cfg.job.seed,
        }
        m.setdefault("limit_per_source", 0)  # manifests from before the field was recorded: full sets
        diff = [f"{k} {m.get(k)!r} -> {v!r}" for k, v in want.items() if m.get(k) != v]
        if diff:
            return Verdict(False, f"{self.shards / MANIFEST} was made with other settings: {'; '.join(diff)}")
        return Verdict(True, f"{self.shards / MANIFEST} lists {m['samples']} samples, every shard there with its size")

    def check_tokenizer(self) -> Verdict:
        if not self.tokenizer.is_file():
            return Verdict(False, f"no {self.tokenizer}")
        import sentencepiece as spm

        try:
            pieces = spm.SentencePieceProcessor(model_file=str(self.tokenizer)).get_piece_size()
        except (OSError, RuntimeError) as e:
            return Verdict(False, f"unreadable {self.tokenizer} ({e})")
        if pieces != self.demo_cfg.tokenizer.vocab_size:
            return Verdict(False, f"{self.tokenizer} has {pieces} pieces, tokenizer.vocab_size is "
                                  f"{self.demo_cfg.tokenizer.vocab_size}")  # fmt: skip
        return Verdict(True, f"{self.tokenizer} is there with {pieces} pieces")

    def check_tokens(self) -> Verdict:
        problem = shard_set_problem(self.tokens)
        if problem:
            return Verdict(False, problem)
        m, final = read_manifest(self.tokens), self.final("dvae")
        if not same_checkpoint(str(m.get("dvae_checkpoint", "")), final):
            return Verdict(False, f"{self.tokens} was encoded with {m.get('dvae_checkpoint')}, not the final dVAE "
                                  f"checkpoint {final}")  # fmt: skip
        if m.get("augmentations") != AUGMENTATIONS or Path(str(m.get("image_shards"))) != self.shards:
            return Verdict(False, f"{self.tokens} holds {m.get('augmentations')} views of {m.get('image_shards')}, "
                                  f"not {AUGMENTATIONS} of {self.shards}")  # fmt: skip
        return Verdict(True, f"{self.tokens / MANIFEST} lists every shard with its size, encoded with {final}")

    def check_samples(self) -> Verdict:
        out = self.root / "samples"
        verdict = self.check_file(out / "samples.png", "png")
        if not verdict.skip:
            return verdict
        try:
            scores = json.loads((out / "scores.json").read_text())
        except (OSError, ValueError) as e:
            return Verdict(False, f"no readable {out / 'scores.json'} ({type(e).__name__})")
        want = {kind: str(self.final(kind)) for kind in ("prior", "dvae", "clip")} | self.sample_args
        diff = [f"{k} {scores.get(k)!r} -> {v!r}" for k, v in want.items() if scores.get(k) != v]
        if [c.get("caption") for c in scores.get("captions", [])] != self.captions:
            diff.append("the captions")
        if diff:
            return Verdict(False, f"{out / 'scores.json'} records other settings: {'; '.join(diff)}")
        return verdict

    def check_file(self, path: Path, kind: str) -> Verdict:
        if not path.is_file() or path.stat().st_size == 0:
            return Verdict(False, f"no {path}")
        if kind == "json":
            try:
                rep = json.loads(path.read_text())
            except ValueError as e:
                return Verdict(False, f"unreadable {path} ({e})")
            missing = bad_figures(rep) if isinstance(rep, dict) else ["everything"]
            if missing:  # e.g. written by an older demo_report.py
                return Verdict(False, f"{path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        return Verdict(True, f"{path} is there")  # run() then checks that it is newer than its inputs

    # --- running ----------------------------------------------------------------------------------------------

    def run(self, force: bool, dry_run: bool = False) -> int:
        stages = self.stages()
        by_name = {s.name: s for s in stages}
        t_all = time.time()
        env = dict(os.environ)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
        for i, st in enumerate(stages, 1):
            head = f"demo: [{i}/{len(stages)}] {st.name}"
            rebuilt = [d for d in st.deps if by_name[d].ran]
            if force:
                verdict = Verdict(False, "--force", fresh=True)
            elif rebuilt:
                verdict = Verdict(False, f"{' and '.join(rebuilt)} rebuilt in this run", fresh=True)
            else:
                verdict = st.check()
                if verdict.skip:
                    inputs = st.inputs() if st.inputs is not None else [by_name[d].stamp() for d in st.deps]
                    verdict = self.newer_inputs(st.stamp(), inputs, verdict)
            if verdict.skip:
                print(f"{head}: skipped: {verdict.why}", flush=True)
                continue
            cmd = st.command(verdict.fresh)
            if dry_run:
                print(f"{head}: would run ({verdict.why})\n  $ {shlex.join(cmd)}", flush=True)
                st.ran = True
                continue
            print(f"{head}: running ({verdict.why})\n  $ {shlex.join(cmd)}", flush=True)
            t0 = time.time()
            rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
            st.seconds, st.ran = time.time() - t0, True
            if rc != 0:
                print(f"demo: {st.name} failed (exit {rc}) after {_dur(st.seconds)}: {shlex.join(cmd)}", flush=True)
                return rc
            print(f"demo: {st.name} done in {_dur(st.seconds)}", flush=True)
        if not dry_run:
            self.summary(stages, time.time() - t_all)
        return 0

    @staticmethod
    def newer_inputs(out: Path, inputs: list[Path], verdict: Verdict) -> Verdict:
        """`verdict`, turned into a rerun when one of the `inputs` is newer than the output `out`."""
        newer = [str(p) for p in inputs if p.is_file() and mtime(p) > mtime(out)]
        if newer:
            return Verdict(False, f"{', '.join(newer)} newer than {out}")
        return Verdict(True, verdict.why + (", newer than its inputs" if inputs else ""))

    def summary(self, stages: list[Stage], total: float) -> None:
        dvae_images = sorted((self.cfgs["dvae"].run_dir / "images").glob("recon_step*.png"))
        rows = [
            ("samples", self.root / "samples" / "samples.png"),
            ("dVAE recon", dvae_images[-1] if dvae_images else "(none: no dVAE evaluation yet)"),
            ("curves", self.root / "curves.png"),
            ("report", self.root / "report.json"),
        ]
        print(f"\ndemo{' --quick' if self.quick else ''}: done in {_dur(total)}")
        for name, path in rows:
            print(f"  {name:<11} {path}")
        try:
            rep = json.loads((self.root / "report.json").read_text())
            d, p = rep["dvae"], rep["prior"]
            print(f"  dVAE        psnr_db {d['psnr_db']:.2f} | content_psnr_db {d['content_psnr_db']:.2f} | "
                  f"content_perplexity {d['content_perplexity']:.1f} | codes_used_fraction "
                  f"{d['codes_used_fraction']:.3f} | mean_rgb_mae {d['mean_rgb_mae']:.3f} | k-means yardstick "
                  f"{d.get('kmeans_psnr_db', float('nan')):.2f} dB")  # fmt: skip
            nan = float("nan")
            print(f"  prior       caption_following_x_chance {p['caption_following_x_chance']:.2f} "
                  f"(+- {p.get('caption_following_stderr_x', nan):.2f}; {p['captions']} captions x {p['per_caption']}; "
                  f"first 4 of each {p.get('caption_following_4_x_chance', nan):.2f}; real images "
                  f"{p.get('caption_following_real_x_chance', nan):.2f}) | fid_samples {p['fid_samples']:.1f} "
                  f"| fid_floor {p['fid_floor']:.1f} "
                  f"| fid_ceiling {p['fid_ceiling']:.1f} | fid_fraction {p['fid_fraction']:.3f}")  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"  report      unreadable ({type(e).__name__}: {e})")
        times = " | ".join(f"{s.name} {_dur(s.seconds) if s.ran else 'skipped'}" for s in stages)
        print(f"  wall time   {times} | total {_dur(total)}")


def _dur(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run of every stage in a few minutes")
    p.add_argument("--force", action="store_true", help="rerun every stage (training runs start over)")
    p.add_argument("--dry-run", action="store_true", help="say what each stage would do, run nothing")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars of the training runs (auto: when stderr is a terminal)")  # fmt: skip
    p.add_argument("--demo-config", default=str(REPO / "megadalle/configs/demo.toml"))
    p.add_argument("--dvae-config", default=str(REPO / "megadalle/configs/dvae_small.toml"))
    p.add_argument("--prior-config", default=str(REPO / "megadalle/configs/prior_small.toml"))
    p.add_argument("--clip-config", default=str(REPO / "megadalle/configs/clip_small.toml"))
    args = p.parse_args(argv)
    for name in ("demo_config", "dvae_config", "prior_config", "clip_config"):
        setattr(args, name, os.path.relpath(Path(getattr(args, name)).resolve(), REPO))
    os.chdir(REPO)  # the configs' paths (outputs/...) are relative to the repository
    try:
        demo = Demo(args)
    except ConfigError as e:
        print(f"demo: config error: {e}", file=sys.stderr)
        return 2
    return demo.run(args.force, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
