"""AdamW with the paper's 16-bit moments (Ramesh et al. 2021, App. D and E): the first moment stored in the 1-6-9
format, the second in 0-6-10 (no sign bit), clipped to `v_clip` (5) before it is stored (and used clipped); 4
bytes of optimizer state per parameter instead of fp32 Adam's 8. A group with `moments16 = False` keeps fp32
moments (`make_optimizer` gives that to gains, biases, embeddings and unembeddings, App. D.2: the groups whose
`kind` is not "matrix", whatever their weight decay). The update is computed in fp32 from the fresh moments, which
are then encoded (kernels/powersgd.py's codec: Triton on a GPU, its bit-identical PyTorch twin on the CPU). The
0-6-10 format's exponent bias (60) keeps g^2 of per-element gradients down to ~1e-10 (kernels/powersgd.py).

The codes are int16 state tensors. torch's `Optimizer.load_state_dict` casts floating-point parameters' state to
the parameter's dtype, which would turn them into fp32 holding the code values; a pre hook checks that the saved
16-bit groups' moments are int16 codes and a post hook casts them back (exact: fp32 holds every int16), so a
resumed run continues bit for bit and the Triton decode accepts them. Each group records the variance format's
exponent bias (`v_bias`); a state saved without it is from when the 0-6-10 format had bias 31, and its variance
codes are re-encoded at the current bias on load (exact: every bias-31 value up to the clip is representable).

Decoupled weight decay and bias correction as torch.optim.AdamW. Plain torch.optim.Optimizer, so DeepSpeed's
ZeRO stages take it as a client optimizer (they hand it their fp32 partitions as parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kernels.powersgd import FMT_0610, FMT_169, Fmt, decode_torch, encode_torch, ops_for

LEGACY_V_BIAS = 31
"""The 0-6-10 format's exponent bias in states saved without `v_bias` (megadalle before issue 26)."""


class AdamW16(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        v_clip: float = 5.0,
    ) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"AdamW16: betas must be in [0, 1), got {betas}")
        if v_clip <= 0:
            raise ValueError(f"AdamW16: v_clip must be positive, got {v_clip}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, v_clip=v_clip, v_bias=FMT_0610.bias)
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(_check_codes)
        self.register_load_state_dict_post_hook(_restore_codes)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW16 does not support sparse gradients")
                ops, paper16 = ops_for(p.device), group.get("moments16", True)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    dtype = torch.int16 if paper16 else torch.float32  # 1-6-9 / 0-6-10 codes, or fp32
                    state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if paper16:
                    m, v = ops.decode(m, FMT_169), ops.decode(v, FMT_0610)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if paper16:
                    v.clamp_(max=group["v_clip"])  # before storage; the update uses the clipped value too
                    state["exp_avg"] = ops.encode(m, FMT_169)
                    state["exp_avg_sq"] = ops.encode(v, FMT_0610)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - b1**t)).div_(denom)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def _check_codes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Before `load_state_dict` (which casts them to fp32): the saved 16-bit groups' moments must be int16 codes."""
    for group in state_dict["param_groups"]:
        if not group.get("moments16", True):
            continue
        for i in group["params"]:
            for key, value in state_dict["state"].get(i, {}).items():
                if key in ("exp_avg", "exp_avg_sq") and value.dtype != torch.int16:
                    raise ValueError(f"AdamW16.load_state_dict: {key} of a 16-bit group is {value.dtype}, not int16 "
                                     "codes (a state saved with fp32 moments?)")  # fmt: skip
    for group in state_dict["param_groups"]:
        bias = group.get("v_bias", LEGACY_V_BIAS)
        if bias not in (LEGACY_V_BIAS, FMT_0610.bias):
            raise ValueError(f"AdamW16.load_state_dict: the variance was saved in 0-6-10 with exponent bias {bias}; "
                             f"this version reads {FMT_0610.bias} (and re-encodes {LEGACY_V_BIAS})")  # fmt: skip


def _restore_codes(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: the 16-bit moments back to int16 codes (torch made fp32 of them; `_check_codes`
    saw int16), the variance re-encoded at the current exponent bias if it was saved at the legacy one."""
    legacy = Fmt(signed=False, m=FMT_0610.m, bias=LEGACY_V_BIAS)
    for group in optimizer.param_groups:
        if not group.get("moments16", True):
            group["v_bias"] = FMT_0610.bias
            continue
        rebias = group.get("v_bias", LEGACY_V_BIAS) != FMT_0610.bias
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != torch.int16:
                    state[key] = state[key].to(torch.int16)
            if rebias and "exp_avg_sq" in state:
                state["exp_avg_sq"] = encode_torch(decode_torch(state["exp_avg_sq"], legacy), FMT_0610)
        group["v_bias"] = FMT_0610.bias


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state the optimizer holds (moments), for the memory per parameter."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def make_optimizer(groups: list[dict[str, Any]], moments: str, lr: float, betas: tuple[float, float], eps: float):
    """AdamW over `groups` (each with its weight decay and its `kind`, engine/optim.py's param_groups), with fp32
    moments (torch's) or the paper's 16-bit ones: those for the matmul and conv weights (kind "matrix", with or
    without weight decay); gains, biases, embeddings and unembeddings (kind "other") keep fp32 moments (App. D.2)."""
    if moments == "fp32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if moments == "paper16":
        kinds = [g.get("kind") for g in groups]
        if any(k not in ("matrix", "other") for k in kinds):
            raise ValueError(f"optim.moments = paper16 needs each group's kind ('matrix' or 'other'), got {kinds}")
        groups = [{**g, "moments16": g["kind"] == "matrix"} for g in groups]
        return AdamW16(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optim.moments must be fp32 or paper16, got {moments!r}")
