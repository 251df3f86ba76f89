"""Block-sparse attention for the DALL-E prior's masks (Ramesh et al. 2021, Sec. 2.2 and App. B.1, Fig. 11).

q, k, v (B, nh, N, hd) -> out (B, nh, N, hd), N = text_len + height * width, any hd <= 128 (32, 64 and 128
tested), fp32, fp16 or bf16 with fp32 accumulation. The mask is a `MaskSpec` (row, column in
transposed order, conv, or dense causal), not a matrix: a lookup table built once from its block layout lists,
for each query block, the non-empty key blocks and whether each is FULL; the kernel visits only those, and on a
PARTIAL block (the diagonal, band edges, the text/image boundary) evaluates the mask's definition element by
element (`_allowed`, the same arithmetic as `MaskSpec.allowed`). No N x N tensor exists at run time.

Forward: online softmax over the visited blocks (FlashAttention-2), saving the log-sum-exp lse (B, nh, N) fp32.
Backward: delta = rowsum(dO * O) in PyTorch, then one kernel per key block for dK, dV (visiting the query blocks
that attend to it: the transposed table) and one per query block for dQ, so no atomics are needed.

Interpreter (TRITON_INTERPRET=1, CPU): bf16 is upcast to fp32 right after loading (the interpreter computes
garbage on bf16); plain pointer arithmetic only (triton 3.7 to 3.9).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megadalle.models.sparsity import EMPTY, FULL, MaskSpec

KINDS = {"causal": 0, "row": 1, "column": 2, "conv": 3}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hd), masked by spec.dense()) v, computed in fp32, cast back."""
    mask = spec.dense().to(q.device)  # (N, N)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


@dataclass(frozen=True)
class BlockTable:
    """The lookup tables of one (spec, block): CSR lists of visited blocks, int32, on one device.
    by_q: for query block i, key blocks cols[off[i]:off[i+1]] (ascending), full[...] = 1 where FULL;
    by_k: for key block j, query blocks rows[off[j]:off[j+1]], the transposed table, for dK and dV."""

    block: int
    q_off: torch.Tensor
    q_cols: torch.Tensor
    q_full: torch.Tensor
    k_off: torch.Tensor
    k_rows: torch.Tensor
    k_full: torch.Tensor

    @property
    def visited(self) -> int:
        return int(self.q_cols.numel())


def _csr(layout: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nz = layout != EMPTY  # (rows, cols)
    off = torch.zeros(layout.shape[0] + 1, dtype=torch.int32)
    off[1:] = nz.sum(dim=1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)  # row-major: ascending columns within each row
    full = (layout[rows, cols] == FULL).to(torch.int32)
    return off.to(device), cols.to(torch.int32).to(device), full.to(device)


def block_table(spec: MaskSpec, block: int, device: torch.device | str) -> BlockTable:
    """The tables for `spec` at `block` on `device`. The caller owns and reuses them (TritonAttention keeps one
    per device); the functional builds them per call when none is given."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    layout = spec.layout(block)  # (nb, nb) int8
    dev = torch.device(device)
    q_off, q_cols, q_full = _csr(layout, dev)
    k_off, k_rows, k_full = _csr(layout.t().contiguous(), dev)
    return BlockTable(block, q_off, q_cols, q_full, k_off, k_rows, k_full)


@triton.jit
def _allowed(offs_m, offs_n, N, T, H, W, HALF, KIND: tl.constexpr):
    """(BLOCK, BLOCK) bool: query offs_m[:, None] may attend to key offs_n[None, :] (MaskSpec.allowed)."""
    q = offs_m[:, None]
    k = offs_n[None, :]
    i = q - T
    j = k - T
    if KIND == 1:  # row: the previous W image positions and itself
        image = (i - j) <= W
    elif KIND == 2:  # column, transposed order: causal inside contiguous groups of H
        image = (i // H) == (j // H)
    elif KIND == 3:  # conv: rows within HALF above, columns within HALF modulo W
        dc = (j % W - i % W + HALF + W) % W
        image = ((i // W - j // W) <= HALF) & ((dc <= 2 * HALF) | (2 * HALF >= W))
    else:  # causal
        image = j >= 0
    return (k <= q) & (q < N) & (k < N) & ((j < 0) | image)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 operands multiply in full fp32 (not tf32), so fp32 matches the reference; fp16/bf16 use tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(ptr, offs, offs_d, N, HD, SN, UPCAST: tl.constexpr):
    """(BLOCK, BLOCK_D) rows offs of an (N, HD) matrix with row stride SN (unit column stride), zero outside;
    fp32 when UPCAST."""
    inside = (offs[:, None] < N) & (offs_d[None, :] < HD)
    x = tl.load(ptr + offs[:, None] * SN + offs_d[None, :], mask=inside, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _visit(q, K, V, kb, full, offs_m, offs_d, qk_scale, N, T, H, W, HALF, HD, SN,
           KIND: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Key block kb seen from the query rows offs_m: its k, v (BLOCK, BLOCK_D), the scores q k^T in log2 units
    (BLOCK, BLOCK) and which of them are attended (FULL blocks: all in range; PARTIAL: `_allowed`)."""
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    k = _load_rows(K, offs_n, offs_d, N, HD, SN, UPCAST)
    v = _load_rows(V, offs_n, offs_d, N, HD, SN, UPCAST)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if full != 0:
        keep = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    else:
        keep = _allowed(offs_m, offs_n, N, T, H, W, HALF, KIND)
    return k, v, s, keep


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, Q_OFF, Q_COLS, Q_FULL, sm_scale, N, T, H, W, HALF, HD, NH, SB, SH, SN,
    KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # B * nh on axis 0: axes 1 and 2 are limited to 65535
    qb = tl.program_id(1)
    qkv = (bh // NH) * SB + (bh % NH) * SH  # q, k, v share strides (views of one qkv projection)
    Q += qkv
    K += qkv
    V += qkv
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, N, HD, SN, UPCAST)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)  # finite: a row with nothing visible yet stays NaN-free
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    start = tl.load(Q_OFF + qb)
    end = tl.load(Q_OFF + qb + 1)
    for idx in range(start, end):
        k, v, s, keep = _visit(q, K, V, tl.load(Q_COLS + idx), tl.load(Q_FULL + idx), offs_m, offs_d, qk_scale,
                               N, T, H, W, HALF, HD, SN, KIND, BLOCK, UPCAST, IEEE)  # fmt: skip
        s = tl.where(keep, s, float("-inf"))  # (BLOCK, BLOCK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    row = offs_m < N
    tl.store(OUT + bh * N * HD + offs_m[:, None] * HD + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row[:, None] & (offs_d[None, :] < HD))  # fmt: skip
    tl.store(LSE + bh * N + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row)  # natural log


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, K_OFF, K_ROWS, K_FULL, sm_scale, N, T, H, W, HALF, HD, NH, SB, SH, SN,
    DSB, DSH, DSN,
    KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    qkv = (bh // NH) * SB + (bh % NH) * SH
    Q += qkv
    K += qkv
    V += qkv
    DO += (bh // NH) * DSB + (bh % NH) * DSH
    LSE += bh * N
    DELTA += bh * N
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, offs_n, offs_d, N, HD, SN, UPCAST)
    v = _load_rows(V, offs_n, offs_d, N, HD, SN, UPCAST)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    start = tl.load(K_OFF + kb)
    end = tl.load(K_OFF + kb + 1)
    for idx in range(start, end):
        qb = tl.load(K_ROWS + idx)
        full = tl.load(K_FULL + idx)
        offs_m = qb * BLOCK + tl.arange(0, BLOCK)
        q = _load_rows(Q, offs_m, offs_d, N, HD, SN, UPCAST)
        do = _load_rows(DO, offs_m, offs_d, N, HD, DSN, UPCAST)
        lse = tl.load(LSE + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634  # log2 units
        delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BLOCK_M, BLOCK_N)
        if full != 0:
            keep = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        else:
            keep = _allowed(offs_m, offs_n, N, T, H, W, HALF, KIND)
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk *= sm_scale
    col = (offs_n[:, None] < N) & (offs_d[None, :] < HD)
    tl.store(DK + bh * N * HD + offs_n[:, None] * HD + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col)
    tl.store(DV + bh * N * HD + offs_n[:, None] * HD + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_OFF, Q_COLS, Q_FULL, sm_scale, N, T, H, W, HALF, HD, NH, SB, SH, SN,
    DSB, DSH, DSN,
    KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # B * nh on axis 0: axes 1 and 2 are limited to 65535
    qb = tl.program_id(1)
    qkv = (bh // NH) * SB + (bh % NH) * SH
    Q += qkv
    K += qkv
    V += qkv
    DO += (bh // NH) * DSB + (bh % NH) * DSH
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, N, HD, SN, UPCAST)
    do = _load_rows(DO, offs_m, offs_d, N, HD, DSN, UPCAST)
    lse = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_m, mask=offs_m < N, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    start = tl.load(Q_OFF + qb)
    end = tl.load(Q_OFF + qb + 1)
    for idx in range(start, end):
        k, v, s, keep = _visit(q, K, V, tl.load(Q_COLS + idx), tl.load(Q_FULL + idx), offs_m, offs_d, qk_scale,
                               N, T, H, W, HALF, HD, SN, KIND, BLOCK, UPCAST, IEEE)  # fmt: skip
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq *= sm_scale
    tl.store(DQ + bh * N * HD + offs_m[:, None] * HD + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_d[None, :] < HD))  # fmt: skip


def default_block(device: torch.device) -> int:
    """64 on a GPU (a 32-wide image row or column band touches 2 key blocks; 128 would visit ~2x the empty
    pairs); 16 under the interpreter, where each program runs in Python and small blocks keep tests fast."""
    return 16 if device.type == "cpu" else 64


FP32_WARPS, FP32_STAGES = 16, 1
"""fp32 runs its dots in full fp32 on the CUDA cores (IEEE, no tensor cores): at Triton's default 4 warps and 3
stages its 64 x 64 tiles spill tens of KB per thread and ptxas takes 10-60 s a kernel for sm_90 (dK/dV at head
dim 128: 59 s, 57 KB of spill stores). 16 warps and no pipelining (tools/compile_kernels.py on a 2-core CPU, head
dim 64 / 128, fwd + dK/dV + dQ): 8.3 s / 10 s against 30-45 s / 95 s at (4, 3), 0-1.3 KB / 0-2 KB of spills.
fp32 is the reference precision (tests, an fp32 run), not the fast path."""


def launch_config(dtype: torch.dtype, hd: int) -> dict[str, int]:
    """num_warps and num_stages of the three kernels for q's dtype and head dim: the launchers' one choice
    (megadalle/engine/kernel_compile.py compiles what it returns for sm_90). fp16, bf16: Triton's defaults, 4 warps and
    3 stages, at every head dim up to 128 (the widest tested). fp32: FP32_WARPS and FP32_STAGES."""
    if dtype == torch.float32:
        return dict(num_warps=FP32_WARPS, num_stages=FP32_STAGES)
    return dict(num_warps=4, num_stages=3)


def _meta(q: torch.Tensor, spec: MaskSpec, block: int) -> dict:
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRET)
    return dict(KIND=KINDS[spec.kind], BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                UPCAST=upcast, IEEE=upcast, **launch_config(q.dtype, q.shape[-1]))  # fmt: skip


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, nh, N, hd) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32, fp16, bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if spec.kind == "column" and not spec.transposed:
        raise ValueError("the kernel takes the column mask in transposed order (MaskSpec transposed=True)")
    if q.shape[2] != spec.n:
        raise ValueError(f"the mask {spec} is for {spec.n} positions, got N = {q.shape[2]}")
    if q.shape[-1] > 128:  # the backward keeps q, k, v, dO tiles of BLOCK x hd on chip: 128 is what is tested
        raise ValueError(f"head dim {q.shape[-1]} > 128 is not supported")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU; q is on {q.device}")


def _args(spec: MaskSpec, q: torch.Tensor) -> tuple[int, ...]:
    """The mask's numbers, then hd, nh and q's (= k's = v's) batch, head and row strides."""
    return (spec.n, spec.text_len, spec.height, spec.width, spec.kernel // 2, q.shape[3], q.shape[1], *q.stride()[:3])


def _empty(q: torch.Tensor) -> torch.Tensor:
    """A contiguous (B, nh, N, hd) output (empty_like would copy a strided input's layout; the kernels store
    outputs contiguously)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, t: BlockTable
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, nh, N, hd = q.shape
    block = t.block
    o = _empty(q)
    lse = torch.empty(B, nh, N, device=q.device, dtype=torch.float32)
    grid = (B * nh, triton.cdiv(N, block))
    _fwd_kernel[grid](q, k, v, o, lse, t.q_off, t.q_cols, t.q_full, 1.0 / math.sqrt(hd), *_args(spec, q),
                      **_meta(q, spec, block))  # fmt: skip
    return o, lse


def _backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    spec: MaskSpec, t: BlockTable,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, nh, N, hd = q.shape
    block = t.block
    delta = (do.float() * o.float()).sum(dim=-1)  # (B, nh, N)
    dq, dk, dv = _empty(q), _empty(k), _empty(v)
    nb = triton.cdiv(N, block)
    args, meta = (*_args(spec, q), *do.stride()[:3]), _meta(q, spec, block)
    _bwd_dkdv_kernel[(B * nh, nb)](q, k, v, do, lse, delta, dk, dv, t.k_off, t.k_rows, t.k_full,
                                   1.0 / math.sqrt(hd), *args, **meta)  # fmt: skip
    _bwd_dq_kernel[(B * nh, nb)](q, k, v, do, lse, delta, dq, t.q_off, t.q_cols, t.q_full,
                                 1.0 / math.sqrt(hd), *args, **meta)  # fmt: skip
    return dq, dk, dv


class _BlockSparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, block: int | None = None,
                table: BlockTable | None = None) -> torch.Tensor:  # fmt: skip
        _check(q, k, v, spec)
        if table is None:
            table = block_table(spec, block or default_block(q.device), q.device)
        elif table.q_off.device != q.device or (block and block != table.block):
            raise ValueError(f"the lookup table is for block {table.block} on {table.q_off.device}, "
                             f"not block {block} on {q.device}")  # fmt: skip
        if q.stride(-1) != 1 or k.stride() != q.stride() or v.stride() != q.stride():
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernels take one set of strides
        # else: strided views (the transformer's q, k, v are slices of one projection) are read in place
        o, lse = _forward(q, k, v, spec, table)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.table = spec, table
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.spec, ctx.table)
        return dq, dk, dv, None, None, None


block_sparse_attention = _BlockSparseAttentionFn.apply
"""block_sparse_attention(q, k, v, spec, block=None, table=None) -> (B, nh, N, hd): q, k, v (B, nh, N, hd), spec
a MaskSpec; `table` a BlockTable from `block_table` to reuse across calls (else built for this call)."""
