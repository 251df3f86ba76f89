"""Checkpoint conversions (tools/convert_checkpoint.py is their command line): a consolidated safetensors export,
resharding a ZeRO-3 checkpoint to another world size, OpenAI's released dVAE imported, and `--verify`'s probe.

Nothing here holds the whole model beside one tensor where the conversion does not need it: an export streams the
weights tensor by tensor from the shards into the file (the model built on the meta device for its names and
shapes); a reshard's rank reads each parameter whole from the memory-mapped source shards, keeps its share and
drops the rest. `--verify` builds the whole model on both sides (meant for models that fit one host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megadalle.config import JobConfig, apply_toml_text, dump_toml
from megadalle.engine.checkpoint import (
    EXTRA,
    SAFETENSORS_FORMAT,
    carried_files,
    find_resume,
    incomplete_reason,
    open_eval_weights,
    step_folders,
    write_weights_checkpoint,
)
from megadalle.engine.consolidate import ConversionError, open_zero3, read_zero_checkpoint
from megadalle.engine.tensor_files import write_streamed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TOL = {"fp32": 0.0, "fp16": 2e-2, "bf16": 1e-1}


# --- the checkpoint side ---------------------------------------------------------------------------------------


def checkpoint_folder(path: str | Path) -> Path:
    """A complete step folder: `path` itself, or the newest complete one under a checkpoints/ folder."""
    path = Path(path)
    if path.is_dir() and step_folders(path):
        newest = find_resume(path, "auto")
        if newest is None:
            raise ConversionError(f"no complete checkpoint under {path}")
        return newest
    if not path.is_dir():
        raise ConversionError(f"no checkpoint folder {path}")
    reason = incomplete_reason(path)
    if reason is not None:
        raise ConversionError(f"{path} is not a complete checkpoint: {reason}")
    return path


def read_extra(folder: Path) -> tuple[dict[str, Any], JobConfig]:
    """extra.pt (step, the loop's state; whole weights in checkpoints of an older megadalle) and its JobConfig."""
    try:
        extra = torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{folder} has no {EXTRA}: not a megadalle checkpoint") from None
    except Exception as e:
        raise ConversionError(f"cannot read {folder / EXTRA}: {type(e).__name__}: {e}") from None
    cfg = JobConfig()
    apply_toml_text(cfg, extra["config"], f"{folder / EXTRA} (stored config)")
    return extra, cfg


def build_model(cfg: JobConfig) -> torch.nn.Module:
    from megadalle.stages.load import BUILDERS

    return BUILDERS[cfg.job.stage](cfg)


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's whole shape (a ZeRO-3 partitioned parameter's `ds_shape`)."""
    out = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in model.named_parameters()}
    out.update({k: tuple(b.shape) for k, b in model.named_buffers()})
    return out


def check_fits(state: dict[str, Any], model: torch.nn.Module, where: str) -> None:
    """Raise naming the missing, unexpected and misshapen keys when `state` (name -> tensor or shape) is not
    `model`'s."""
    expected = {k: v for k, v in shapes_of(model).items() if k in model.state_dict()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = [f"{k} {got[k]} != {expected[k]}"
              for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]  # fmt: skip
    if missing or unexpected or shapes:
        raise ConversionError(f"{where} does not match the model its config builds: {len(missing)} missing keys "
                              f"[{_listed(missing)}], {len(unexpected)} unexpected [{_listed(unexpected)}], "
                              f"{len(shapes)} shapes (weights != model) [{_listed(shapes)}]")  # fmt: skip


def probe(model: torch.nn.Module, stage: str) -> dict[str, torch.Tensor]:
    """The model's outputs on a fixed batch (seeded inputs, eval mode, fp32): what --verify compares."""
    from megadalle.models.dvae_loss import map_pixels

    g = torch.Generator().manual_seed(1234)
    model = model.float().eval()
    with torch.no_grad():
        if stage == "dvae":
            a = model.args
            side = min(a.image_size, 64)  # any multiple of 2^(groups-1) works: 64 px keeps the paper's model fast
            x = map_pixels(torch.rand(2, 3, side, side, generator=g))
            logits = model.encoder(x)  # (2, K, h, w)
            codes = torch.randint(0, a.vocab_size, logits.shape[2:], generator=g).expand(2, -1, -1)
            z = torch.nn.functional.one_hot(codes, a.vocab_size).permute(0, 3, 1, 2).float()
            return {"encoder_logits": logits, "decoder_output": model.decoder(z)}
        if stage == "prior":
            a = model.a
            text = torch.randint(1, a.text_vocab, (2, a.text_len), generator=g)
            image = torch.randint(0, a.image_vocab, (2, a.grid * a.grid), generator=g)
            out = model(text, image)
            return {"text_logits": out.text_logits, "image_logits": out.image_logits}
        a = model.args
        images = torch.rand(2, 3, a.image_size, a.image_size, generator=g)
        text = torch.randint(1, a.text_vocab, (2, a.text_len), generator=g)
        return {"image_embeddings": model.embed_images(images), "text_embeddings": model.embed_text(text)}


def compare(name: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    """Print the largest absolute difference of each output; return the largest."""
    worst = 0.0
    for key in a:
        diff = (a[key].float() - b[key].float()).abs().max().item()
        print(f"verify {name}: {key} {tuple(a[key].shape)} max |difference| {diff:.3g}")
        worst = max(worst, diff)
    print(f"verify {name}: {'OK' if worst <= tol else 'FAILED'} (max {worst:.3g}, tolerance {tol:g})")
    return worst


def outputs_of(state: dict[str, torch.Tensor], cfg: JobConfig) -> dict[str, torch.Tensor]:
    model = build_model(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return probe(model, cfg.job.stage)


# --- export ----------------------------------------------------------------------------------------------------


def export(ckpt: str, out: str, weights: str, dtype: str, verify: bool, tol: float | None) -> int:
    """Streams: one tensor at a time from the checkpoint's shards into the file (peak memory about the largest
    tensor); the model is built on the meta device for its names and shapes only."""
    from megadalle.stages.load import load_trained

    folder = checkpoint_folder(ckpt)
    extra, cfg = read_extra(folder)
    try:
        source = open_eval_weights(folder, weights)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    with torch.device("meta"):
        model = build_model(cfg)
    check_fits(source.shapes, model, f"{folder} ({weights} weights)")
    kinds = {k: v.dtype for k, v in model.state_dict().items()}
    cast = {k: DTYPES[dtype] if kinds[k].is_floating_point else kinds[k] for k in source.shapes}
    specs = {k: (cast[k], shape) for k, shape in source.shapes.items()}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SAFETENSORS_FORMAT, "stage": cfg.job.stage, "weights": weights, "step": str(extra["step"]),
            "dtype": dtype, "source": str(folder), "config": dump_toml(cfg)}  # fmt: skip
    write_streamed(out_path, specs, lambda name: source.read(name).to(specs[name][0]).contiguous(), meta)
    args = model.args if hasattr(model, "args") else model.a
    sidecar = {k: v for k, v in meta.items() if k != "config"}
    sidecar.update(config=cfg.to_dict(), model_args=asdict(args))
    out_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"exported {len(specs)} tensors ({weights} weights, {dtype}) of {folder} -> {out_path} (+ .json)")
    if not verify:
        return 0
    loaded, _ = load_trained(out_path, cfg.job.stage)  # the path sampling takes: no DeepSpeed
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    worst = compare("export", outputs_of(dict(source.items()), cfg), probe(loaded, cfg.job.stage), tol)
    return 0 if worst <= tol else 1


# --- reshard ---------------------------------------------------------------------------------------------------


def reshard(ckpt: str, out: str, world: int, verify: bool, tol: float | None) -> int:
    """Launch `world` CPU processes (unless this is already one rank of a launch of that many), each writing its
    share of the new checkpoint."""
    from megadalle.engine.consolidate import zero_stage_of
    from megadalle.engine.launcher import detect, free_port

    folder = checkpoint_folder(ckpt)
    extra, cfg = read_extra(folder)
    if world < 1:
        raise ConversionError(f"--world must be at least 1, got {world}")
    stage = zero_stage_of(folder)
    if stage != 3:
        raise ConversionError(f"{folder} was written at ZeRO stage {stage}; reshard converts ZeRO-3 checkpoints "
                              "(ZeRO-0 loads at any world size as it is)")  # fmt: skip
    if cfg.optim.moments != "fp32":
        raise ConversionError(f"{folder}: optim.moments = {cfg.optim.moments} (16-bit Adam moments) cannot be "
                              "resharded yet")  # fmt: skip
    out_root = Path(out)
    if out_root.resolve() == folder.parent.resolve():
        raise ConversionError(f"--out {out_root} is the source's own checkpoints folder: write the resharded "
                              "checkpoint elsewhere")  # fmt: skip
    if detect() != "single":  # started by torchrun, srun or mpirun: this process is one rank of the new world
        reshard_rank(folder, out_root)
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megadalle.engine.convert",
               str(folder), str(out_root)]  # fmt: skip
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise ConversionError(f"resharding {folder} to {world} ranks failed (exit {proc.returncode})")
    target = out_root / folder.name
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"resharded {folder} -> {target} ({world} ranks)")
    if not verify:
        return 0
    tol = 0.0 if tol is None else tol
    a, b = read_zero_checkpoint(folder), read_zero_checkpoint(target)
    diffs = {"weights": _max_diff(a.weights, b.weights)}
    for m in ("exp_avg", "exp_avg_sq"):
        diffs[m] = _max_diff({k: v[m] for k, v in a.moments.items()}, {k: v[m] for k, v in b.moments.items()})
    if extra.get("weights_kind") == "ema":
        diffs["EMA"] = _max_diff(dict(open_eval_weights(folder, "ema").items()),
                                 dict(open_eval_weights(target, "ema").items()))  # fmt: skip
    said = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
    print(f"verify reshard: max |difference| {said}; optimizer steps {a.steps} -> {b.steps}")
    worst = compare("reshard", outputs_of({**a.weights, **a.buffers}, cfg), outputs_of({**b.weights, **b.buffers}, cfg),
                    tol)  # fmt: skip
    ok = max(worst, *diffs.values()) <= tol and a.steps == b.steps
    return 0 if ok else 1


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ConversionError(f"the two sides hold different parameters: {_listed(sorted(a.keys() ^ b.keys()))}")
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


def reshard_rank(folder: Path, out_root: Path) -> None:
    """One rank of the target world: the model and optimizer built as train.py builds them; each parameter's
    fp32 master copy and Adam moments set from the source's whole tensors, read one at a time from the
    memory-mapped shards (this rank's share of each kept, padded as ZeRO-3 pads the last one), the 16-bit
    partitions refreshed from them, the optimizer's step per group, DeepSpeed's loss scaler, the EMA, the lr
    schedule and the gradient scales; saved by the checkpoint writer. The source's per-rank files (data positions,
    generators) go into `from_world_<N>/` (a resume at N ranks takes them back); earlier such folders and
    PowerSGD's summed error buffers are carried over."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    from megadalle.engine.checkpoint import save_checkpoint
    from megadalle.engine.distributed import init_distributed, shutdown
    from megadalle.engine.ds_config import load_ds_config
    from megadalle.engine.ema import shard_slice
    from megadalle.stages import make_stage
    from megadalle.train import build

    extra, cfg = read_extra(folder)
    source = open_zero3(folder)
    _, world = init_distributed()
    ds = load_ds_config(cfg, world)
    if ds.get("zero_optimization", {}).get("stage", 0) != 3:
        raise ConversionError(f"{cfg.parallel.deepspeed_config} is not a ZeRO-3 config")
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    engine, opt = state.engine, state.engine.optimizer
    check_fits({**source.shapes, **{k: v.shape for k, v in source.buffers().items()}}, engine.module, f"{folder}")
    steps = source.steps
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):  # AdamW's state, one step tensor per sub-group
        group = opt.sub_group_to_group_id[i]
        step = torch.tensor(steps[group] if group < len(steps) else 0.0)
        opt.optimizer.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}  # fmt: skip
    for name, p in engine.module.named_parameters():
        rank, shards = opt._get_param_partition_rank(p), dist.get_world_size(p.ds_process_group)
        safe_set_local_fp32_param(p, shard_slice(source.weight(name), rank, shards))
        for m, whole in source.moments(name).items():
            safe_set_local_optimizer_state(p, shard_slice(whole, rank, shards), m)
    for low, high in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
        low.data.copy_(high.data)  # the module's own (16-bit or fp32) shards, which the forward and the save use
    for key, value in source.loss_scaler.items():  # DeepSpeed's own fp16 scaler (train.grad_scaler = global)
        setattr(opt, key, value)
    if state.ema is not None:
        if extra.get("weights_kind") != "ema":
            raise ConversionError(f"{folder} holds no EMA but its config keeps one (optim.ema_decay > 0)")
        source_ema = open_eval_weights(folder, "ema")
        for name, whole in source_ema.items():  # one parameter at a time
            state.ema.load_whole(name, whole)
        state.ema.updates = source_ema.updates
    loop = dict(extra.get("loop", {}))
    for name, part in state.parts().items():
        if part.scope == "global" and name in loop:
            part.load_state_dict(loop[name])
    # the data positions and generators belong to the source's world (kept in from_world_<N>/), PowerSGD's buffers
    # are carried over as they are
    state.data, state.rng, state.powersgd = None, None, None
    copy_in = carried_files(folder)
    save_checkpoint(out_root, int(extra["step"]), state, cfg, 0, copy_in=copy_in)
    shutdown()


# --- import of OpenAI's dVAE -------------------------------------------------------------------------------------


def load_openai_module(path: str | Path) -> torch.nn.Module:
    """A pickled module of OpenAI's `dall-e` package (encoder.pkl / decoder.pkl), unpickled by torch's
    `weights_only` unpickler with only the classes those modules are made of allowed (the package's Encoder,
    Decoder, their blocks and Conv2d; torch's Sequential, ReLU, MaxPool2d, Upsample, Identity): anything else in
    the file is refused instead of run."""
    from dall_e.decoder import Decoder, DecoderBlock
    from dall_e.encoder import Encoder, EncoderBlock
    from dall_e.utils import Conv2d
    from torch import nn

    allowed = [Encoder, EncoderBlock, Decoder, DecoderBlock, Conv2d, nn.Sequential, nn.ReLU, nn.MaxPool2d,
               nn.Upsample, nn.Identity]  # fmt: skip
    try:
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"no file {path}") from None
    except Exception as e:
        raise ConversionError(f"{path}: not one of OpenAI's dVAE modules (refused by the restricted unpickler: "
                              f"{str(e).splitlines()[0][:300]})") from None  # fmt: skip
    if not isinstance(module, (Encoder, Decoder)):
        raise ConversionError(f"{path} holds a {type(module).__name__}, not a dall_e Encoder or Decoder")
    return module


def import_openai_dvae(encoder: str, decoder: str, out: str, verify: bool, tol: float | None) -> int:
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    from megadalle.models.dvae import FLAVORS, DiscreteVAE

    enc, dec = load_openai_module(encoder), load_openai_module(decoder)
    if not isinstance(enc, Encoder) or not isinstance(dec, Decoder):
        raise ConversionError(f"expected an Encoder then a Decoder, got {type(enc).__name__} ({encoder}) and "
                              f"{type(dec).__name__} ({decoder})")  # fmt: skip
    sizes = {"group_count": enc.group_count, "n_hid": enc.n_hid, "n_blk_per_group": enc.n_blk_per_group,
             "vocab_size": enc.vocab_size, "n_init": dec.n_init}  # fmt: skip
    if (dec.n_hid, dec.n_blk_per_group, dec.vocab_size) != (enc.n_hid, enc.n_blk_per_group, enc.vocab_size):
        raise ConversionError(f"{encoder} and {decoder} are not a pair: encoder {sizes}, decoder n_hid {dec.n_hid}, "
                              f"n_blk_per_group {dec.n_blk_per_group}, vocab_size {dec.vocab_size}")  # fmt: skip
    flavor = next(
        (
            name
            for name, a in FLAVORS.items()
            if a.upsample == "nearest" and all(getattr(a, k) == v for k, v in sizes.items())
        ),
        None,
    )  # the release upsamples by nearest neighbour
    if flavor is None:
        raise ConversionError(f"the modules' sizes {sizes} match no dVAE flavor in megadalle.models.dvae.FLAVORS "
                              f"({ {n: asdict(a) for n, a in FLAVORS.items()} })")  # fmt: skip
    cfg = JobConfig()
    cfg.job.stage, cfg.job.name, cfg.model.dvae_flavor = "dvae", Path(out).name, flavor
    model = DiscreteVAE(FLAVORS[flavor])
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    state = {k: v.float() for k, v in state.items()}
    check_fits(state, model, f"{encoder} + {decoder}")
    folder = write_weights_checkpoint(Path(out), state, cfg, f"OpenAI dall-e release: {encoder}, {decoder}")
    print(f"imported OpenAI's dVAE ({flavor} flavor, {sum(v.numel() for v in state.values()) / 1e6:.1f}M "
          f"parameters) -> {folder}")  # fmt: skip
    if not verify:
        return 0
    from megadalle.models.dvae_loss import map_pixels
    from megadalle.stages.load import load_trained

    ours, _ = load_trained(folder, "dvae")
    mine = probe(ours, "dvae")
    g = torch.Generator().manual_seed(1234)  # the inputs probe() draws, through OpenAI's modules
    side = min(ours.args.image_size, 64)
    x = map_pixels(torch.rand(2, 3, side, side, generator=g))
    with torch.no_grad():
        logits = enc.float()(x)
        codes = torch.randint(0, enc.vocab_size, logits.shape[2:], generator=g).expand(2, -1, -1)
        z = torch.nn.functional.one_hot(codes, enc.vocab_size).permute(0, 3, 1, 2).float()
        theirs = {"encoder_logits": logits, "decoder_output": dec.float()(z)}
    tol = 1e-4 if tol is None else tol
    return 0 if compare("import-openai-dvae", theirs, mine, tol) <= tol else 1


if __name__ == "__main__":  # one rank of `reshard`'s launch: python -m megadalle.engine.convert FOLDER OUT
    reshard_rank(Path(sys.argv[1]), Path(sys.argv[2]))
