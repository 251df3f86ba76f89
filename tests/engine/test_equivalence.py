"""ZeRO-3 on 2 ranks trains the same model as plain single-process PyTorch (no DeepSpeed): identical initial
parameters from the same seed, identical optimizer groups, weight decay really applied, and the same losses over
5 AdamW updates. The reference below uses only torch: the stage's model builder and parameter groups, AdamW, and
the model's own loss over the whole batch (the prior) or over the same micro-batches (dVAE, reranker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megadalle.config import load_config
from megadalle.engine.optim import group_names
from megadalle.stages import make_stage
from tests.conftest import REPO, torchrun

pytestmark = pytest.mark.distributed

STEPS = 5
LOSS_RTOL = 1e-4
"""Relative tolerance on each update's loss: the two sides sum the same gradients in different orders (gloo's
reduce-scatter), and 5 Adam updates amplify those fp32 rounding differences to ~1e-6 relative."""


BF16_LOSS_RTOL = 1e-3
"""Under train.autocast = bf16 (against torch.autocast in the reference): a rank's half-batch and the reference's
whole batch round their bf16 matmuls apart; measured within this."""


def _args(stage: str, token_shards: Path, tokenizer_model: Path, tmp_path: Path, shards: Path) -> list[str]:
    common = [f"--job.run_root={tmp_path}", "--parallel.deepspeed_config=ds_configs/zero3_cpu.json",
              "--train.micro_batch_size=2", "--optim.ema_decay=0", "--optim.grad_clip=1.0"]  # fmt: skip
    if stage.endswith("_bf16"):  # train.autocast: bf16 matmuls from fp32 parameters, against torch.autocast
        common.append("--train.autocast=bf16")
    if stage.startswith("prior"):
        accum = ["--train.micro_batch_size=1", "--train.grad_accum_steps=2"] if stage == "prior_accum" else []
        if stage == "prior_triton":  # the Triton kernels (interpreter on the CPU) in every layer
            accum = ["--model.attention=triton"]
        return ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
                f"--tokenizer.model_path={tokenizer_model}", "--train.activation_checkpointing=true",
                "--optim.warmup_steps=0", "--optim.lr=3e-3", *common, *accum]  # fmt: skip
    if stage.startswith("dvae"):  # weight decay 1e-4 x lr 1e-3 would be below fp32 resolution in the decay check
        # dvae_warm: 2 warm-start updates (k-means codes of the emoji shards), the moments reset, 3 of the ELB
        warm = ["--dvae.warm_start_steps=2", "--dvae.warm_start_images=16"] if stage == "dvae_warm" else []
        return ["--config", "megadalle/configs/dvae_debug.toml", "--dvae.kl_warmup_steps=2", f"--data.shards={shards}",
                "--optim.weight_decay=0.1", *common, *warm]  # fmt: skip
    return ["--config", "megadalle/configs/clip_debug.toml", f"--tokenizer.model_path={tokenizer_model}",
            "--optim.warmup_steps=0", *common]  # fmt: skip


def _batches(stage: str, cfg) -> list[list[list]]:
    """STEPS updates of one global batch of 4 (so that the loss must fall): for each rank, its micro-batches
    (one of 2 samples; for prior_accum two of 1 sample each)."""
    g = torch.Generator().manual_seed(7)
    if stage.startswith("prior"):
        T, HW = cfg.tokenizer.max_len, 64
        text = torch.randint(4, 300, (4, T), generator=g)
        for i, n in enumerate((2, 4, T, T)):  # rank 0: short captions, rank 1: full ones
            text[i, n:] = 0
        codes = torch.randint(0, 256, (4, HW), generator=g)
        if stage == "prior_accum":  # rank 0: a 2-token and a 4-token caption, rank 1: two full ones
            return [[[(text[i : i + 1], codes[i : i + 1]) for i in (2 * r, 2 * r + 1)] for r in (0, 1)]] * STEPS
        halves = [(text[:2], codes[:2]), (text[2:], codes[2:])]
    elif stage.startswith("dvae"):
        x = 0.1 + 0.8 * torch.rand(4, 3, 32, 32, generator=g)  # mapped pixels
        halves = [x[:2], x[2:]]
    else:
        images = torch.rand(4, 3, 32, 32, generator=g)
        text = torch.randint(4, 300, (4, 16), generator=g)
        halves = [(images[:2], text[:2]), (images[2:], text[2:])]
    return [[[half] for half in halves]] * STEPS


def _reference(stage_name: str, cfg, steps: list[list]) -> dict:
    """Plain PyTorch, one process: the same seed, groups, schedules and data."""
    stage = make_stage(cfg)
    torch.manual_seed(cfg.job.seed)
    model = stage.build_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = stage.param_groups(model)
    o = cfg.optim
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    losses = []
    if cfg.train.autocast == "bf16":  # plain torch AMP: the model's forward under torch.autocast
        forward = model.forward
        model.forward = lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(*a, **k)
    for step, halves in enumerate(steps):
        sched = stage.schedules(step)
        if step == stage.moments_reset_step:
            opt.state.clear()  # fresh Adam moments, as train.py's reset_moments
        for group in opt.param_groups:
            group["lr"] = sched["lr"]
        opt.zero_grad()
        micro = [mb for per_rank in halves for mb in per_rank]
        if stage_name.startswith("prior"):  # the whole batch at once: the model's own normalisation over all targets
            text, codes = (torch.cat(t) for t in zip(*micro))
            loss = model(text, codes).loss
            loss.backward()
        else:  # the same micro-batches, each with the seed the ZeRO-3 ranks use (gumbel noise)
            loss = 0.0
            for half in micro:
                torch.manual_seed(1000 + step)
                if stage_name.startswith("dvae"):  # the stage's loss: the warm start's k-means codes, then the ELB
                    part = stage.loss(model, half, sched, {"samples": 4})[0]
                else:
                    part = model(*half).loss * len(half[0]) / 4
                part.backward()
                loss += part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        losses.append(float(loss.detach()) if torch.is_tensor(loss) else loss)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"init": init, "groups": group_names(model, groups), "losses": losses, "final": final}


EXPECTED_DECAY = {
    # module-type rule: Linear / conv weights decay; gains, biases, embeddings, unembeddings (heads) do not
    "prior": lambda n: n.endswith(("qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")),
    "prior_accum": lambda n: n.endswith(("qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")),
    "prior_triton": lambda n: n.endswith(("qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")),
    "dvae": lambda n: n.endswith(".w"),
    "dvae_warm": lambda n: n.endswith(".w"),
    "clip": lambda n: n.endswith(".weight") and not any(k in n for k in ("norm", ".ln", "tok.", "pos.")),
}
EXPECTED_DECAY["prior_bf16"], EXPECTED_DECAY["dvae_bf16"] = EXPECTED_DECAY["prior"], EXPECTED_DECAY["dvae"]


@pytest.mark.parametrize(
    "stage_name",
    [
        "prior",
        "prior_accum",
        "dvae",
        "dvae_warm",
        "clip",
        "prior_bf16",
        "dvae_bf16",
        pytest.param("prior_triton", marks=pytest.mark.slow),
    ],  # fmt: skip
)
def test_zero3_two_ranks_equal_plain_pytorch(stage_name, tmp_path, token_shards, tokenizer_model, emoji_shards):
    """prior_triton: ZeRO-3 with activation checkpointing and the Triton kernels in every layer (column layers
    transposed), against plain PyTorch with dense masked SDPA."""
    if stage_name == "prior_triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU ranks need the Triton interpreter (conftest sets it where there is no GPU)")
    args = _args(stage_name, token_shards, tokenizer_model, tmp_path, emoji_shards)
    cfg = load_config(args)
    steps = _batches(stage_name, cfg)
    torch.save({"steps": steps}, tmp_path / "batches.pt")
    proc = torchrun(REPO / "tests" / "engine" / "equivalence_worker.py", nproc=2,
                    args=[str(tmp_path / "batches.pt"), str(tmp_path / "zero3.pt"), "--", *args])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    z = torch.load(tmp_path / "zero3.pt")
    ref_cfg = load_config([*args, "--model.attention=dense"]) if stage_name == "prior_triton" else cfg
    ref = _reference(stage_name, ref_cfg, steps)

    # identical initial parameters: every module initialised itself, zero.Init kept it
    assert z["init"].keys() == ref["init"].keys()
    for name, p in ref["init"].items():
        assert torch.equal(z["init"][name], p), f"{name}: ZeRO-3 initial value differs from plain PyTorch"

    # identical optimizer groups, chosen by module type (not by the 1-D shape of ZeRO-3's placeholders)
    assert z["groups"] == ref["groups"]
    want = sorted(n for n in ref["init"] if EXPECTED_DECAY[stage_name](n))
    assert sorted(ref["groups"]["decay"]) == want and want
    wd = cfg.optim.weight_decay
    assert [(g["lr"], g["weight_decay"]) for g in z["ds_groups"]] == [(cfg.optim.lr, wd), (cfg.optim.lr, 0.0)]

    # weight decay really applied: with zero gradients, a decayed parameter shrinks by lr x wd, the rest stay
    lr = z["zero_step_lr"]
    decayed = set(ref["groups"]["decay"])
    for name, p in z["init"].items():
        after = z["after_zero_grad_step"][name]
        want_p = p * (1 - lr * wd) if name in decayed else p
        torch.testing.assert_close(after, want_p, rtol=1e-6, atol=0, msg=name)
        if name in decayed:
            assert not torch.equal(after, p), f"{name}: the decay is below fp32 resolution, the check proves nothing"

    # the same training: losses of 5 updates, and the parameters they lead to
    assert z["losses"] == pytest.approx(
        ref["losses"], rel=BF16_LOSS_RTOL if cfg.train.autocast == "bf16" else LOSS_RTOL
    )
    assert ref["losses"][-1] < ref["losses"][0], "the reference trains"
    # Each Adam update moves an element by at most ~lr; an element whose gradient is near zero can move the other
    # way on rounding alone (m / sqrt(v) of a tiny g is +-1). So: every element within 10% of the largest possible
    # movement, and the whole update within 2% of its norm.
    # Under bf16 autocast the two sides' gradients differ by bf16 rounding (~0.4%), which Adam's sign-like first
    # steps turn into whole lr-sized moves for small gradients: elements within the largest possible movement, the
    # whole update within 10% of its norm.
    bf16 = cfg.train.autocast == "bf16"
    bound = (1.0 if bf16 else 0.1) * cfg.optim.lr * STEPS
    for name, p in ref["final"].items():
        torch.testing.assert_close(z["final"][name], p, rtol=0, atol=bound, msg=name)
    names = sorted(ref["final"])
    update = torch.cat([(ref["final"][n] - ref["init"][n]).flatten() for n in names])
    diff = torch.cat([(z["final"][n] - ref["final"][n]).flatten() for n in names])
    assert diff.norm() < (0.1 if bf16 else 0.02) * update.norm(), (diff.norm().item(), update.norm().item())
