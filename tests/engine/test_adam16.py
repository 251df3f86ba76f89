"""engine/adam16.py, AdamW with the paper's 16-bit moments: against torch's AdamW (one step, a run, the update at
per-element gradient sizes 1e-2 down to 1e-8), the second moment clipped to 5, 4 bytes of state per parameter,
16-bit moments chosen by parameter kind (weight decay 0 included), checkpointable with the int16 codes restored
exactly; and the debug prior trained through train.py and ZeRO-3 with `optim.moments = paper16` tracking fp32
moments over 50 updates."""

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


@pytest.mark.parametrize("size", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
def test_update_matches_fp32_adamw_down_to_tiny_gradients(size) -> None:
    """Per-element gradients of `size` (1e-6 is ordinary at 12B: RMS ~ norm / sqrt(1.2e10)), fresh each step, 200
    steps at App. B.2's beta2 0.96 and eps 1e-8: the mean and the largest |update| within 2% of fp32 AdamW's. With
    the 0-6-10 format at exponent bias 31, g^2 below 2^-40 flushed to zero and the update became m / eps (at 1e-6:
    85% of v zero, the mean update 9.7x, the largest 84x)."""
    n, steps = 4096, 200
    p16, p32 = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    opt16 = AdamW16([p16], lr=1.0, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    opt32 = torch.optim.AdamW([p32], lr=1.0, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    u16, u32 = torch.empty(steps, n), torch.empty(steps, n)
    zero_v = 0
    for t in range(steps):
        grad = torch.randn(n, generator=g) * size
        for p, opt, u in ((p16, opt16, u16), (p32, opt32, u32)):
            with torch.no_grad():
                p.zero_()  # lr 1, no decay: the parameter after the step is minus the update, exactly
            p.grad = grad.clone()
            opt.step()
            u[t] = -p.detach()
        zero_v += int((decode_ref(opt16.state[p16]["exp_avg_sq"], FMT_0610) == 0).sum())
    assert zero_v <= 1e-3 * steps * n  # (randn's rare near-zero draws at the first steps: eps dominates there)
    a16, a32 = u16.abs(), u32.abs()
    assert float(a16.mean() / a32.mean()) == pytest.approx(1.0, rel=0.02)
    assert float(a16.max() / a32.max()) == pytest.approx(1.0, rel=0.02)


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
    with pytest.raises(ValueError, match="needs each group's kind"):  # not guessed from the weight decay
        make_optimizer([{"params": [p], "weight_decay": 0.1}], "paper16", 1e-3, (0.9, 0.99), 1e-8)


def test_load_state_dict_restores_the_int16_codes_and_continues_bit_for_bit() -> None:
    """torch's Optimizer.load_state_dict casts state to the parameter's dtype (fp32): the codes come back as int16,
    equal, and the next steps equal those of the optimizer that was never saved (the CPU's decode, like the Triton
    one, refuses fp32 codes)."""
    a, b = _pair(2)
    opts = [AdamW16(m.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=0.045) for m in (a, b)]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 37, generator=g) for _ in range(6)]

    def step(model, opt, x) -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    for x in xs[:3]:
        for model, opt in zip((a, b), opts):
            step(model, opt, x)
    saved = opts[1].state_dict()
    resumed = AdamW16(b.parameters(), lr=1e-2, betas=(0.9, 0.96), weight_decay=0.045)
    resumed.load_state_dict(saved)
    for p, q in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            got = resumed.state[q][key]
            assert got.dtype == torch.int16 and torch.equal(got, opts[0].state[p][key])
    for x in xs[3:]:
        step(a, opts[0], x)
        step(b, resumed, x)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    broken = {**saved, "state": {k: {**v, "exp_avg": v["exp_avg"].float()} for k, v in saved["state"].items()}}
    with pytest.raises(ValueError, match="not int16"):
        AdamW16(b.parameters()).load_state_dict(broken)


def test_a_state_saved_at_the_legacy_variance_bias_is_re_encoded() -> None:
    """States saved before the groups recorded `v_bias` hold 0-6-10 codes at exponent bias 31: read as bias 60 they
    would decode 2^29 too small (sqrt(v) below eps: updates ~100x too large at 1e-6). They are re-encoded on load,
    exactly; an unknown bias is refused."""
    from kernels.powersgd import Fmt, encode_ref

    p = torch.nn.Parameter(torch.zeros(5))
    opt = AdamW16([p], lr=1e-3, betas=(0.9, 0.96))
    p.grad = torch.tensor([1e-2, 1e-3, 3e-4, 0.0, 2.0])  # v = 0.04 g^2: in bias 31's normal range (>= 2^-30), or 0
    opt.step()
    v = decode_ref(opt.state[p]["exp_avg_sq"], FMT_0610)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["v_bias"] == FMT_0610.bias == 60
    legacy = {"state": {0: {**saved["state"][0], "exp_avg_sq": encode_ref(v, Fmt(False, 10, 31))}},
              "param_groups": [{k: x for k, x in saved["param_groups"][0].items() if k != "v_bias"}]}  # fmt: skip
    assert not torch.equal(legacy["state"][0]["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])
    clone = AdamW16([torch.nn.Parameter(p.detach().clone())], lr=1e-3, betas=(0.9, 0.96))
    clone.load_state_dict(legacy)
    state = next(iter(clone.state.values()))
    assert torch.equal(state["exp_avg_sq"], saved["state"][0]["exp_avg_sq"]) and clone.param_groups[0]["v_bias"] == 60
    small = decode_ref(encode_ref(torch.tensor([3e-13, 4e-10]), Fmt(False, 10, 31)), Fmt(False, 10, 31))
    legacy["state"][0]["exp_avg_sq"][:2] = encode_ref(small, Fmt(False, 10, 31))  # bias 31's subnormals, kept
    clone.load_state_dict(legacy)
    assert torch.equal(decode_ref(next(iter(clone.state.values()))["exp_avg_sq"][:2], FMT_0610), small)
    with pytest.raises(ValueError, match="exponent bias 45"):
        AdamW16([p]).load_state_dict({**saved, "param_groups": [{**saved["param_groups"][0], "v_bias": 45}]})


@pytest.mark.parametrize("weight_decay", [0.045, 0.0])
def test_paper16_keeps_fp32_moments_for_gains_biases_and_embeddings(weight_decay) -> None:
    """App. D.2: gains, biases, embeddings and unembeddings keep fp32 moments, the matmul weights get 16-bit ones,
    chosen by the groups' kind: weight decay 0 gives the matrices 16-bit moments too."""
    from megadalle.engine.optim import param_groups
    from megadalle.models.transformer import FLAVORS, DallePrior

    model = DallePrior(FLAVORS["debug"])
    groups = param_groups(model, weight_decay)
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


def _zero3_run(tmp_path, name, token_shards, tokenizer_model, monkeypatch, steps: int) -> tuple[list[dict], str]:
    """train.py (tests/engine/train_worker.py) on 2 real processes, ZeRO-3, paper16 moments, a checkpoint every 3
    updates; each rank dumps the gathered model at every checkpoint into tmp_path/NAME_params."""
    from tests.conftest import torchrun

    args = ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
            f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}", f"--job.name={name}",
            "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--optim.moments=paper16",
            "--train.micro_batch_size=2", "--train.log_every=1", "--train.eval_every=0", "--logging.progress=off",
            "--checkpoint.every=3", f"--train.steps={steps}"]  # fmt: skip
    dump = tmp_path / f"{name}_params"
    dump.mkdir(exist_ok=True)
    monkeypatch.setenv("TRAIN_WORKER_DUMP", str(dump))
    proc = torchrun(REPO / "tests" / "engine" / "train_worker.py", nproc=2, args=args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"], proc.stdout


def _moment_codes(folder) -> dict[str, torch.Tensor]:
    """The 16-bit moments in a ZeRO-3 checkpoint's optimizer files: (rank file, tensor index, key) -> codes."""
    out = {}
    for path in sorted(folder.glob("*optim_states.pt")):
        inner = torch.load(path, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
        for i, state in inner["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{path.name}/{i}/{key}"] = state[key]
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_paper16_resume_equals_the_uninterrupted_run(tmp_path, token_shards, tokenizer_model, monkeypatch):
    """2 ranks, ZeRO-3, paper16: 3 updates, a resume to 6, against 6 uninterrupted updates: the same losses, the
    same parameters and the same int16 moment codes in the step-6 checkpoint, bit for bit. torch's
    Optimizer.load_state_dict made fp32 of the codes; the decode of the first update after the resume refused them
    (on a GPU the Triton launcher, on the CPU decode_torch, which checks the same)."""
    whole, _ = _zero3_run(tmp_path, "whole", token_shards, tokenizer_model, monkeypatch, 6)
    _zero3_run(tmp_path, "parts", token_shards, tokenizer_model, monkeypatch, 3)
    parts, out = _zero3_run(tmp_path, "parts", token_shards, tokenizer_model, monkeypatch, 6)
    assert "step_00000003 at step 3" in out  # resumed
    assert [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in parts] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in parts] == [r["loss"] for r in whole]
    assert [r["grad_norm"] for r in parts] == [r["grad_norm"] for r in whole]
    for rank in range(2):
        a, b = (torch.load(tmp_path / f"{n}_params" / f"params_{rank}_step6.pt") for n in ("whole", "parts"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (_moment_codes(tmp_path / n / "checkpoints" / "step_00000006") for n in ("whole", "parts"))
    assert a and a.keys() == b.keys()
    assert {v.dtype for v in a.values()} >= {torch.int16}  # the matrices' moments (the rest keep fp32)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
