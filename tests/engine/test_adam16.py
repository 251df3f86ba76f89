"""engine/adam16.py, AdamW with the paper's 16-bit moments: against torch's AdamW (one step, a run), the second
moment clipped to 5, 4 bytes of state per parameter, checkpointable; and the debug prior trained through
train.py and ZeRO-3 with `optim.moments = paper16` tracking fp32 moments over 50 updates."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from kernels.powersgd import FMT_0610, FMT_169, decode_ref, quantize_ref
from megadalle.engine.adam16 import AdamW16, make_optimizer, state_bytes
from tests.conftest import REPO, python


def _pair(seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    a = torch.nn.Linear(37, 11)
    b = torch.nn.Linear(37, 11)
    b.load_state_dict(a.state_dict())
    return a, b


def test_first_step_equals_torch_adamw_and_the_moments_are_stored_in_16_bits() -> None:
    a, b = _pair()
    opt16 = AdamW16(a.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=0.045)
    opt32 = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=0.045)
    x = torch.randn(64, 37)
    for model, opt in ((a, opt16), (b, opt32)):
        model(x).square().mean().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)  # the update uses the fresh fp32 moments
    for p, q in zip(a.parameters(), b.parameters()):
        s16, s32 = opt16.state[p], opt32.state[q]
        assert s16["exp_avg"].dtype == s16["exp_avg_sq"].dtype == torch.int16
        assert torch.equal(decode_ref(s16["exp_avg"], FMT_169), quantize_ref(s32["exp_avg"], FMT_169).float())
        assert torch.equal(decode_ref(s16["exp_avg_sq"], FMT_0610), quantize_ref(s32["exp_avg_sq"], FMT_0610).float())
    n = sum(p.numel() for p in a.parameters())
    assert state_bytes(opt16) == 4 * n and state_bytes(opt32) == 8 * n + 4 * 2  # (+ torch's step tensors)


def test_a_run_tracks_torch_adamw() -> None:
    a, b = _pair(1)
    opt16 = AdamW16(a.parameters(), lr=3e-3, betas=(0.9, 0.96), weight_decay=0.045)
    opt32 = torch.optim.AdamW(b.parameters(), lr=3e-3, betas=(0.9, 0.96), weight_decay=0.045)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 11, generator=g)
    for _ in range(200):
        x = torch.randn(32, 37, generator=g)
        for model, opt in ((a, opt16), (b, opt32)):
            opt.zero_grad()
            (model(x) - x @ w).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p - q).norm() <= 2e-3 * q.norm()


def test_second_moment_clipped_to_5_and_state_round_trips() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamW16([p], lr=1e-3, betas=(0.9, 0.5))
    p.grad = torch.tensor([100.0, -1e-3, 0.0])
    opt.step()
    v = decode_ref(opt.state[p]["exp_avg_sq"], FMT_0610)
    assert v[0] == 5.0 and v[1] == pytest.approx(0.5 * 1e-6, rel=2**-10) and v[2] == 0.0
    clone = AdamW16([torch.nn.Parameter(p.detach().clone())], lr=1e-3, betas=(0.9, 0.5))
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(next(iter(clone.state.values()))["exp_avg"], opt.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="fp32 or paper16"):
        make_optimizer([{"params": [p]}], "bf16", 1e-3, (0.9, 0.99), 1e-8)


def test_paper16_keeps_fp32_moments_for_gains_biases_and_embeddings() -> None:
    """App. D.2: the group without weight decay (gains, biases, embeddings, unembeddings) keeps fp32 moments."""
    from megadalle.engine.optim import param_groups
    from megadalle.models.transformer import FLAVORS, DallePrior

    model = DallePrior(FLAVORS["debug"])
    groups = param_groups(model, 0.045)
    opt = make_optimizer(groups, "paper16", 1e-3, (0.9, 0.96), 1e-8)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    n_decay, n_rest = (sum(p.numel() for p in g["params"]) for g in groups)
    assert n_decay > 0 and n_rest > 0 and state_bytes(opt) == 4 * n_decay + 8 * n_rest
    dtypes = {g["name"]: {opt.state[p]["exp_avg"].dtype for p in g["params"]} for g in opt.param_groups}
    assert dtypes == {"decay": {torch.int16}, "no_decay": {torch.float32}}


def _train(tmp_path, name, token_shards, tokenizer_model, *extra) -> list[dict]:
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/prior_debug.toml",
         f"--prior.tokens={token_shards}", f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}",
         f"--job.name={name}", "--train.steps=50", "--train.log_every=1", "--train.eval_every=0",
         "--optim.ema_decay=0", "--logging.progress=off", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_debug_prior_with_paper16_moments_tracks_fp32_moments(tmp_path, token_shards, tokenizer_model) -> None:
    """ZeRO-3 (one process) hands AdamW16 its fp32 partitions; 50 updates at the debug prior's lr 1e-3."""
    fp32 = _train(tmp_path, "fp32", token_shards, tokenizer_model)
    p16 = _train(tmp_path, "p16", token_shards, tokenizer_model, "--optim.moments=paper16")
    assert [r["step"] for r in p16] == list(range(1, 51))
    for a, b in zip(p16, fp32):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * b["loss"], (a["step"], a["loss"], b["loss"])
    last = sum(r["loss"] for r in p16[-10:]) / 10
    assert last == pytest.approx(sum(r["loss"] for r in fp32[-10:]) / 10, rel=0.01)
    assert last < p16[0]["loss"] - 0.5
