"""One configuration tree for every megadalle job.

`JobConfig` holds one dataclass per section. `load_config(argv)` resolves it in this precedence
(highest first), as torchtitan does:

    command line (--section.key=value)  >  TOML run file (--config path.toml)  >  dataclass defaults

Unknown sections and keys are errors, and every value is type-checked against the field's annotation;
errors name the key and where it came from (the TOML file or the command line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value that is unknown, ill-typed or inconsistent; the message names key and origin."""


@dataclass
class Job:
    name: str = "debug"
    """Run name; the run folder is `<job.run_root>/<job.name>`."""
    run_root: str = "outputs"
    """Folder under which each run gets its own folder (config, logs, checkpoints, images)."""
    stage: Literal["dvae", "prior", "clip"] = "dvae"
    """Which model `megadalle/train.py` trains."""
    seed: int = 0
    """Global seed; each rank and data worker derives its own from it."""
    description: str = ""
    """Free text written beside the resolved config."""


@dataclass
class Data:
    shards: str = "outputs/shards"
    """The data: a shard set (a folder, or s3://bucket/prefix/ from tools/upload_shards.py, holding `manifest.json`
    and its splits' `<split>/*.tar`), or webdataset shards without a manifest, as img2dataset writes them, which are
    then the train split: a folder or s3://bucket/prefix/ of `.tar` files, a brace pattern
    (`s3://bucket/cc3m/{00000..00331}.tar`), one `.tar`, or a `.txt` list of shard URLs. Every reader takes any."""
    val_shards: str = ""
    """The validation split's shards, any source `shards` takes ("": the val split of the shard set `shards`;
    needed when `shards` has no manifest)."""
    s3_endpoint: str = ""
    """S3 endpoint URL for s3:// shard sets ("": AWS_ENDPOINT_URL, else AWS's own). Credentials come from boto3's
    standard chain (environment, ~/.aws, instance role), never from a config file."""
    s3_max_retry_s: float = 60.0
    """Seconds of failed attempts at one shard read before the job stops with an error naming it."""
    read_ahead: int = 0
    """s3:// training shards fetched whole this many ahead of the one being read, by a background thread per
    reader (0: each shard streamed as it is read). For stores whose per-object latency is large against a shard's
    read time; on loopback and rate-limited links it gains nothing and costs ~10% (tools/bench_s3.py)."""
    verify_sha256: bool = False
    """Check each training shard's sha256 against the manifest before reading it (fetched whole first); a shard
    that fails twice is skipped, its samples counted and logged."""
    max_caption_chars: int = 1024
    """Training samples with longer captions (or empty ones) are skipped and counted; captions longer than
    tokenizer.max_len tokens but within this are truncated."""
    image_keys: str = "jpg;jpeg;png;webp"
    """The image member of a sample: the first of these extensions it holds (webdataset's `a;b;c` convention;
    img2dataset writes jpg). Any size and mode is read (data/images.py: EXIF orientation, transparency on white,
    grayscale, CMYK, 16-bit)."""
    caption_key: str = "txt"
    """The caption member of a sample."""
    min_image_side: int = 0
    """Training images whose shorter side is below this many pixels are skipped and counted (0: any size)."""
    max_aspect_ratio: float = 0.0
    """Training images whose long side exceeds this many times the short side are skipped and counted (0: any)."""
    image_size: int = 256
    """Side of the square images, in pixels: 256 for the paper, 64 or 32 for CPU runs."""
    sources: list[str] = field(default_factory=lambda: ["twemoji", "openmoji"])
    """Emoji art sets for tools/make_shards.py: twemoji, openmoji, iconify:<set> (needs npm); `name=PATH`
    overrides the folder a set is read from."""
    style_in_caption: bool = True
    """Append the art style to captions ("red heart in openmoji style")."""
    val_percent: float = 5.0
    """Share of concepts (all their images) held out as the in-distribution validation split."""
    zeroshot_percent: float = 12.0
    """Share of concepts for which one skin tone and one art style are held out (the zero-shot split)."""
    shard_max_samples: int = 1000
    """Samples per tar shard."""
    limit_per_source: int = 0
    """Use at most this many images of each source (0: all); for fast tests."""
    render_workers: int = 2
    """Worker processes for rendering emoji in tools/make_shards.py."""
    num_workers: int = 0
    """DataLoader worker processes per rank feeding training batches, each prefetching 2 (0: read in the training
    process, the best on a 2-core CPU); with fewer train shards than ranks x workers, every reader reads every
    shard (split by sample)."""
    shuffle_buffer: int = 1000
    """Each shard's samples are permuted in chunks of this many (data/stream.py: exactly resumable)."""


@dataclass
class Tokenizer:
    model_path: str = "outputs/tokenizer/bpe.model"
    """The sentencepiece model file written by tools/train_tokenizer.py."""
    vocab_size: int = 16384
    """BPE vocabulary size (the paper's 16,384)."""
    max_len: int = 256
    """Text positions of the stream; longer captions are truncated (and counted)."""
    dropout: float = 0.1
    """BPE-dropout probability applied only in training mode (the paper's 10%)."""
    extra_text: list[str] = field(default_factory=list)
    """Extra plain-text files (one sentence a line) added to the captions for tokenizer training."""
    lowercase: bool = True
    """Lower-case captions before encoding, as the paper does."""


@dataclass
class Model:
    dvae_flavor: str = "paper"
    """dVAE size from megadalle.models.dvae.FLAVORS: paper, small, debug."""
    prior_flavor: str = "debug"
    """Transformer prior size from megadalle.models.transformer.FLAVORS."""
    clip_flavor: str = "small"
    """Contrastive reranker size from megadalle.models.clip.FLAVORS: small, debug."""
    attention: Literal["auto", "dense", "blocked", "triton", "flex"] = "auto"
    """Attention implementation of the prior (models/attention.py's registry): `auto` runs the Triton block-sparse
    kernels on a GPU and, on the CPU, `blocked` where it was measured faster than `dense` (streams of >= 256
    positions), else `dense`; `dense` masked SDPA (the reference); `blocked` the block layouts in PyTorch;
    `triton` the kernels (a GPU, or TRITON_INTERPRET=1); `flex` FlexAttention (its backward needs a GPU)."""
    dvae_checkpoint: str = ""
    """dVAE weights used to encode images for the prior (empty: read token shards)."""


@dataclass
class Dvae:
    kl_weight: float = 6.6
    """beta, the KL weight reached after the warm-up (the paper's 6.6)."""
    kl_warmup_steps: int = 5000
    """Updates of the cosine warm-up of beta from 0."""
    tau_start: float = 1.0
    """Gumbel-softmax temperature at step 0."""
    tau_end: float = 0.0625
    """Temperature after annealing (1/16)."""
    tau_steps: int = 150000
    """Updates of the cosine annealing of tau."""
    lr_decay_steps: int = 1200000
    """Updates of the cosine decay of the step size from optim.lr to optim.lr_min."""
    eval_batches: int = 4
    """Validation batches per evaluation."""
    grid_images: int = 8
    """Images in the reconstruction grid PNG written at each evaluation."""
    warm_start_steps: int = 0
    """Updates of the k-means warm start before the paper's objective (0, the paper: none). The decoder learns
    to reconstruct from the k-means codes of the code cells' patches and the encoder to predict them
    (cross-entropy); the tau and beta schedules count from its end. For short runs (configs/dvae_small.toml)."""
    warm_start_images: int = 2000
    """Train images (centre crops, manifest order) whose code-cell patches the warm start's k-means is fit on."""
    elb_lr_scale: float = 1.0
    """After a warm start, the step size of the paper's objective is the lr schedule's times this (1: unchanged).
    The demo lowers it: at the full lr schedule the ELB traded reconstruction for confidence on the
    background (configs/dvae_small.toml). Only with a warm start (warm_start_steps > 0)."""


@dataclass
class Prior:
    tokens: str = "outputs/demo/tokens"
    """Token shard set written by tools/encode_shards.py (its manifest gives the grid and the image vocab)."""
    lr_decay_steps: int = 0
    """Cosine decay from optim.lr to optim.lr_min over this many updates after the warm-up (0: constant)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""


@dataclass
class Optim:
    lr: float = 1e-4
    """Peak step size."""
    lr_min: float = 1.25e-6
    """Final step size of the cosine decay."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2 (0.999 for the dVAE, 0.96 for the prior)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (1e-4 dVAE, 4.5e-2 prior)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off; the prior uses 4)."""
    warmup_steps: int = 0
    """Linear warm-up updates before the schedule."""
    schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    """Step size after the warm-up (prior and reranker; the dVAE always decays by a cosine over
    dvae.lr_decay_steps): constant, cosine decay to lr_min over prior.lr_decay_steps (reranker: the rest of the
    run), or halved on plateaus of the smoothed training loss (the paper's prior)."""
    plateau_patience: int = 2000
    """schedule=plateau: updates without a relative improvement of plateau_threshold before the lr is halved."""
    plateau_threshold: float = 1e-3
    """schedule=plateau: relative improvement of the smoothed loss that resets the patience."""
    plateau_smoothing: float = 0.99
    """schedule=plateau: EMA factor smoothing the training loss."""
    max_halvings: int = 5
    """schedule=plateau: halvings at most (the paper's 5)."""
    ema_decay: float = 0.999
    """Decay of the parameter exponential moving average (0: no EMA)."""
    ema_every: int = 1
    """Update the EMA every this many updates (the prior: 25)."""
    moments: Literal["fp32", "paper16"] = "fp32"
    """Adam's moments: fp32 (torch's AdamW), or the paper's 16-bit formats (App. D/E: the first moment in 1-6-9,
    the second in 0-6-10 clipped to 5; engine/adam16.py)."""


@dataclass
class Train:
    steps: int = 100
    """Optimizer updates to run."""
    micro_batch_size: int = 8
    """Samples per process per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into one update."""
    global_batch_size: int = 0
    """Samples per update over all ranks (the paper's 1,024 for the prior). When set, grad_accum_steps is derived
    as global_batch_size / (micro_batch_size x world size), which must divide; 0: micro x accum x world."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision; fp16 scales gradients as `grad_scaler` says."""
    grad_scaler: Literal["auto", "per_resblock", "global", "none"] = "auto"
    """fp16 only (off in bf16 and fp32): `per_resblock` one scale per resblock of the prior (App. D,
    engine/grad_scaler.py; ZeRO-3 only, run through DeepSpeed's torch_autocast: fp32 parameter storage, fp16
    matmuls, gradients accumulated in fp32);
    `global` DeepSpeed's dynamic loss scale from the DeepSpeed JSON; `none` no scaling (loss scale 1); `auto`
    per_resblock for the prior under ZeRO-3, else global."""
    activation_checkpointing: bool = False
    """Recompute each resblock's activations in backward."""
    autocast: Literal["off", "bf16", "auto"] = "off"
    """With precision fp32: matmuls and convolutions in bf16 under torch.autocast, parameters, gradients, optimizer
    and losses in fp32 (torch AMP; the evaluation's forward too). `auto`: bf16 where the device computes it natively
    (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else off; the log says which (engine/wrap.py)."""
    compile: bool = False
    """torch.compile each resblock (the prior's attention and MLP branches, the dVAE's resblocks, the reranker's
    text blocks and conv stages) from outside the model (engine/wrap.py); compile time logged after update 2."""
    log_every: int = 10
    """Updates between metric lines."""
    eval_every: int = 100
    """Updates between evaluations (validation metrics, image grids)."""
    eval_samples: int = 1024
    """Samples per split in a retrieval evaluation (stage clip); R@k is measured among them."""


@dataclass
class Checkpoint:
    every: int = 0
    """Updates between checkpoints (0: only at the end)."""
    keep: int = 3
    """Checkpoints kept; older ones are removed after a newer one is complete."""
    resume: str = "auto"
    """auto | none | latest | PATH. "auto": the newest complete checkpoint of this run folder (incomplete or
    corrupt newer ones are skipped with a warning), a fresh start when there is none; "latest": same as auto;
    "none": start over, refused while the run folder holds a complete checkpoint unless `overwrite`; PATH: that
    checkpoint folder, which must be complete."""
    overwrite: bool = False
    """With resume = "none": start over in a run folder that holds checkpoints; they are moved aside to
    `checkpoints.old-<time>` (with metrics.jsonl), never deleted."""
    async_save: bool = False
    """Write checkpoints in a background thread while training goes on (torchtitan's async checkpointing): every
    rank copies its shards to host memory (pinned on a GPU) and returns to training; the COMPLETE marker is written
    once every rank has finished writing (agreed at the first update after), so a crash mid-write leaves the
    previous complete checkpoint. Costs a host copy of the rank's checkpoint while it is written. The last
    checkpoint of a run (its end, a signal) is written before the run stops."""
    requeue_on: list[str] = field(default_factory=lambda: ["USR1"])
    """Signals after which the run, having saved a checkpoint, puts its Slurm job back in the queue (USR1: the
    time limit is near, `#SBATCH --signal=USR1@180`; add TERM to requeue on preemption or scancel too). SIGUSR1
    and SIGTERM always stop the run after the current update with a checkpoint (engine/preemption.py)."""


@dataclass
class Parallel:
    deepspeed_config: str = "ds_configs/zero0_cpu.json"
    """DeepSpeed JSON; the values the JobConfig owns are "auto" there and filled from this tree."""
    gpus_per_node: int = 8
    """Ranks of one node group: with powersgd.enabled, ZeRO-3 shards the parameters inside a node group and the
    node groups average their gradients by PowerSGD (the paper: the 8 GPUs of a machine)."""
    collective_timeout_s: float = 1800.0
    """A collective that has not completed after this many seconds fails the job (a rank that hangs)."""
    heartbeat_timeout_s: float = 30.0
    """A rank silent for this long (killed, stopped) ends the job with a message naming it (engine/heartbeat.py;
    0: off)."""


@dataclass
class PowerSGD:
    enabled: bool = False
    """Compress the gradient averaging between node groups (Sec. 2.5, App. E.2; engine/powersgd.py)."""
    rank: int = 896
    """The paper's r (896 for the 12B model, 640 at 5.6B, 512 at 2.8B); each GPU's shards get r / gpus_per_node."""
    start_iter: int = 0
    """Updates averaged uncompressed (one fp32 all-reduce between node groups) before the compression starts."""
    eps: float = 1e-6
    """Added to P's diagonal before the Householder orthogonalisation."""


@dataclass
class Logging:
    json_file: str = "metrics.jsonl"
    """Per-step JSON lines, relative to the run folder."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Python logging level for the readable rank-0 lines."""
    peak_tflops: float = 0.0
    """Declared peak TFLOP/s of one accelerator in the training precision (A100 fp16/bf16 dense: 312, H100 SXM:
    989); the JSON lines then carry `mfu`, the model FLOP utilisation (0: not logged)."""
    tensorboard: bool = True
    """Also write every metric as TensorBoard events into `<run>/tensorboard/` (rank 0)."""
    progress: Literal["auto", "on", "off"] = "auto"
    """A progress bar with the time left over the training updates (rank 0, on stderr): "auto" shows it when
    stderr is a terminal, "on" always, "off" never. Log lines are printed above it."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    data: Data = field(default_factory=Data)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    model: Model = field(default_factory=Model)
    dvae: Dvae = field(default_factory=Dvae)
    prior: Prior = field(default_factory=Prior)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallel: Parallel = field(default_factory=Parallel)
    powersgd: PowerSGD = field(default_factory=PowerSGD)
    logging: Logging = field(default_factory=Logging)

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_root) / self.job.name

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per update on `world_size` ranks: train.grad_accum_steps, or derived from
        train.global_batch_size when that is set."""
        t = self.train
        if not t.global_batch_size:
            return t.grad_accum_steps
        per_pass = t.micro_batch_size * world_size
        if t.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x {world_size} ranks"
            )
        return t.global_batch_size // per_pass

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `where`. Strings come from the command line."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or value in ("none", "None", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _section_types(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    out = {}
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        out[sec.name] = typing.get_type_hints(type(section))
    return out


def _set(cfg: JobConfig, section: str, key: str, value: Any, origin: str) -> None:
    types_ = _section_types(cfg)
    if section not in types_:
        raise ConfigError(f"{origin}: unknown config section '{section}' (sections: {', '.join(types_)})")
    if key not in types_[section]:
        raise ConfigError(
            f"{origin}: unknown config key '{section}.{key}' (section '{section}' has: {', '.join(types_[section])})"
        )
    setattr(getattr(cfg, section), key, _coerce(value, types_[section][key], f"{origin}: {section}.{key}"))


def apply_overrides(cfg: JobConfig, argv: list[str], sections: tuple[str, ...] | None = None) -> None:
    """Apply `--section.key=value` (or `--section.key value`) arguments onto `cfg` in place and validate it: a
    tool's overrides of a checkpoint's config. `sections`: the only sections the tool takes."""
    toml_path, overrides = _parse_argv(argv)
    if toml_path is not None:
        raise ConfigError("command line: --config is not taken here (the config is the checkpoint's)")
    for name, value in overrides:
        section, dot, key = name.partition(".")
        if sections is not None and section not in sections:
            raise ConfigError(f"command line: --{name}: only {', '.join(f'--{s}.KEY' for s in sections)} are taken")
        if not dot:
            raise ConfigError(f"command line: --{name} is not of the form --section.key")
        _set(cfg, section, key, value, f"command line --{name}")
    validate(cfg)


def _parse_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(the `--config` path, the `--section.key=value` / `--section.key value` / bare `--flag` overrides in order)."""
    toml_path: str | None = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r} (expected --section.key=value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            else:
                value = "true"
        if name == "config":
            toml_path = value
        else:
            overrides.append((name, value))
        i += 1
    return toml_path, overrides


def apply_toml_text(cfg: JobConfig, text: str, origin: str) -> None:
    """Apply TOML text onto `cfg` in place; errors name `origin`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: malformed TOML: {e}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: top-level key '{section}' must be a [section] table")
        for key, value in values.items():
            _set(cfg, section, key, value, origin)


def apply_toml(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Apply a TOML run file onto `cfg` in place."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    apply_toml_text(cfg, text, str(path))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (a string literal after the annotated assignment), read
    from its source: what `--help` prints."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):  # fmt: skip
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_help(section: str | None = None) -> str:
    """Every key of every section (or of `section`), with its type, default and docstring, from the dataclasses."""
    import textwrap

    defaults = JobConfig()
    sections = [f.name for f in dataclasses.fields(JobConfig)]
    if section is not None and section not in sections:
        raise ConfigError(f"--help {section}: no such section (sections: {', '.join(sections)})")
    lines = ["usage: [--config RUN.toml] [--section.key=value ...] [--help [SECTION]]",
             "Precedence: command line > TOML run file > these defaults. Lists are comma-separated.", ""]  # fmt: skip
    for name in [section] if section else sections:
        part = getattr(defaults, name)
        cls = type(part)
        lines.append(f"[{name}]")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(part, f.name)
            shown = json.dumps(value) if isinstance(value, (str, list, bool)) or value is None else repr(value)
            lines.append(f"  --{name}.{f.name}  ({f.type}, default {shown})")
            for text in docs.get(f.name, "(undocumented)").splitlines():
                lines.append(textwrap.indent(textwrap.fill(text, 112) if text else "", "      "))
        lines.append("")
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Resolve a JobConfig: CLI args > TOML file > JobConfig defaults.

    argv accepts `--config PATH` (a TOML run file; applied first whatever its position) and any number of
    `--section.key=value` or `--section.key value` overrides. A bare `--section.flag` sets a bool to true.
    Lists are comma-separated on the command line. `--help [SECTION]` (or `-h`) prints every key (of SECTION) with
    its type, default and docstring and exits, as argparse's `--help` does.
    """
    argv = list(argv or [])
    for i, arg in enumerate(argv):
        if arg in ("--help", "-h"):
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
            print(config_help(nxt))
            raise SystemExit(0)
    toml_path, overrides = _parse_argv(argv)
    cfg = JobConfig()
    if toml_path is not None:
        apply_toml(cfg, toml_path)
    for name, value in overrides:
        section, dot, key = name.partition(".")
        if not dot:
            raise ConfigError(f"command line: --{name} is not of the form --section.key")
        _set(cfg, section, key, value, f"command line --{name}")
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that no single type annotation can express."""
    checks = [
        (cfg.data.image_size > 0, f"data.image_size must be positive, got {cfg.data.image_size}"),
        (0 <= cfg.data.val_percent < 100, f"data.val_percent must be in [0, 100), got {cfg.data.val_percent}"),
        (
            0 <= cfg.data.zeroshot_percent < 100,
            f"data.zeroshot_percent must be in [0, 100), got {cfg.data.zeroshot_percent}",
        ),
        (cfg.data.shard_max_samples > 0, f"data.shard_max_samples must be positive, got {cfg.data.shard_max_samples}"),
        (cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}"),
        (cfg.data.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {cfg.data.shuffle_buffer}"),
        (cfg.data.read_ahead >= 0, f"data.read_ahead must be >= 0, got {cfg.data.read_ahead}"),
        (cfg.data.s3_max_retry_s > 0, f"data.s3_max_retry_s must be positive, got {cfg.data.s3_max_retry_s}"),
        (cfg.data.max_caption_chars > 0, f"data.max_caption_chars must be positive, got {cfg.data.max_caption_chars}"),
        (cfg.tokenizer.vocab_size >= 64, f"tokenizer.vocab_size must be >= 64, got {cfg.tokenizer.vocab_size}"),
        (cfg.tokenizer.max_len > 0, f"tokenizer.max_len must be positive, got {cfg.tokenizer.max_len}"),
        (0 <= cfg.tokenizer.dropout < 1, f"tokenizer.dropout must be in [0, 1), got {cfg.tokenizer.dropout}"),
        (cfg.train.micro_batch_size > 0, f"train.micro_batch_size must be positive, got {cfg.train.micro_batch_size}"),
        (cfg.train.grad_accum_steps > 0, f"train.grad_accum_steps must be positive, got {cfg.train.grad_accum_steps}"),
        (cfg.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {cfg.optim.grad_clip}"),
        (cfg.optim.plateau_patience > 0, f"optim.plateau_patience must be positive, got {cfg.optim.plateau_patience}"),
        (cfg.optim.max_halvings >= 0, f"optim.max_halvings must be >= 0, got {cfg.optim.max_halvings}"),
        (
            0 <= cfg.optim.plateau_smoothing < 1,
            f"optim.plateau_smoothing must be in [0, 1), got {cfg.optim.plateau_smoothing}",
        ),
        (cfg.train.global_batch_size >= 0, f"train.global_batch_size must be >= 0, got {cfg.train.global_batch_size}"),
        (0 <= cfg.optim.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}"),
        (
            cfg.parallel.collective_timeout_s > 0,
            f"parallel.collective_timeout_s must be positive, got {cfg.parallel.collective_timeout_s}",
        ),
        (
            cfg.parallel.heartbeat_timeout_s == 0 or cfg.parallel.heartbeat_timeout_s >= 5,
            f"parallel.heartbeat_timeout_s must be 0 (off) or at least 5, got {cfg.parallel.heartbeat_timeout_s}",
        ),
        (
            set(cfg.checkpoint.requeue_on) <= {"USR1", "TERM"},
            f"checkpoint.requeue_on must name USR1 and/or TERM, got {cfg.checkpoint.requeue_on}",
        ),
        (cfg.dvae.warm_start_steps >= 0, f"dvae.warm_start_steps must be >= 0, got {cfg.dvae.warm_start_steps}"),
        (
            cfg.dvae.warm_start_images > 0,
            f"dvae.warm_start_images must be positive, got {cfg.dvae.warm_start_images}",
        ),
        (cfg.dvae.elb_lr_scale > 0, f"dvae.elb_lr_scale must be positive, got {cfg.dvae.elb_lr_scale}"),
        (
            cfg.dvae.elb_lr_scale == 1 or cfg.dvae.warm_start_steps > 0,
            f"dvae.elb_lr_scale = {cfg.dvae.elb_lr_scale} scales the lr after a warm start, but "
            "dvae.warm_start_steps is 0: set both, or leave elb_lr_scale at 1 (scale optim.lr instead)",
        ),
        (cfg.logging.peak_tflops >= 0, f"logging.peak_tflops must be >= 0, got {cfg.logging.peak_tflops}"),
        (
            cfg.train.autocast == "off" or cfg.train.precision == "fp32",
            f"train.autocast = {cfg.train.autocast} computes in bf16 from fp32 parameters, but train.precision is "
            f"{cfg.train.precision}: set train.precision = fp32, or train.autocast = off",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: JobConfig) -> str:
    """The resolved config as a TOML run file that `load_config(["--config", path])` reads back identically."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_resolved(cfg: JobConfig, folder: str | os.PathLike) -> Path:
    """Write `config.toml` (the resolved config) into `folder` atomically and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dump_toml(cfg))
    os.replace(tmp, path)
    return path
