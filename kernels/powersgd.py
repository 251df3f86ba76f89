"""PowerSGD's kernels (Ramesh et al. 2021, Sec. 2.5, App. E.1-E.2) and the paper's 16-bit formats (App. D, E).

16-bit formats, `FMT_169` (1 sign, 6 exponent, 9 significand bits: error buffers, the all-reduced P, Adam's first
moment) and `FMT_0610` (no sign, 6 exponent, 10 significand bits: Adam's second moment). Subnormals at exponent
field 0 and no infinities: the top exponent field (63) holds NaN only, so with exponent bias b the largest value is
(2 - 2^-m) * 2^(62 - b), the smallest normal 2^(1 - b) and the smallest subnormal 2^(1 - b - m). The paper does
not state the biases (App. B.2, D, E); each format's is chosen from what it stores:
- 1-6-9, bias 31 (the IEEE-like 2^5 - 1): signed gradient-sized quantities, the PowerSGD error buffers (unscaled
  gradients), the all-reduced P whose infinities App. E.2 clamps to the format's largest value, Adam's first
  moment. Normal from 2^-30 (9.3e-10, subnormals to 2^-39 = 1.8e-12) up to 4.29e9: a per-element gradient of
  1e-8 keeps 8 significant bits, and the clamp sits far above any finite gradient.
- 0-6-10, bias 60: Adam's variance v, clipped to 5 (App. B.2) before it is stored. 60 is the largest bias whose
  top value still holds the clip: (2 - 2^-10) * 2^2 = 7.996 (bias 61 would top out at 4). Its smallest normal
  2^-59 = (2^-29.5)^2 matches the first moment's normal floor (sqrt(v) and |m| lose precision together), with
  subnormals down to 2^-69 (1.7e-21): g^2 of per-element gradients down to ~1e-10 survives, and a flushed v moves
  the update by under 2% (sqrt(25 x 2^-70) = 1.5e-10 against eps 1e-8, after the first step's bias correction).
  With bias 31 (smallest 2^-40 = 9.1e-13) g^2 of per-element gradients below ~3e-6 flushes to zero and the
  update becomes m / eps: at 1e-6, 85% of v was zero and the mean update 9.7x fp32 Adam's (tests/engine/
  test_adam16.py compares both with fp32 AdamW from 1e-2 down to 1e-8).
Encoding from fp32 rounds to nearest, ties to even; finite values beyond the largest and +-inf saturate to
+-largest (infinities clamped keeping the sign, App. E.2); NaN stays NaN; the unsigned format stores negatives as
+0. Codes are int16 tensors holding the 16-bit patterns.

    encode(x fp32 (...)) -> codes int16 (...)          decode(codes int16 (...)) -> fp32 (...)
    orthogonalize(p (n, r) fp32, eps) -> (n, r) fp32: the Q factor of p + eps * I by Householder reflections
        (n >= r; LAPACK's conventions, so it equals torch.linalg.qr's Q)
    error_feedback_add_(e codes (m, n), g fp32 (m, n), scale): e <- enc(dec(e) + g / scale)
    decompress_update_(e codes (m, n), p (m, r), q (n, r), n_nodes) -> d (m, n) fp32:
        d = p q^T / n_nodes (the averaged gradient), e <- enc(dec(e) - d), set to 0 where not finite

Each has its pure-PyTorch reference (`*_ref`, computed in float64 where it matters). None is differentiated, so
there is no autograd wrapper. Interpreter (TRITON_INTERPRET=1, CPU): plain pointer arithmetic only. The 1-D kernels
and the decompression's rows index in int64 (tensors beyond 2^31 elements).

`ops_for(device, orthogonalize)` gives the five operations: the Triton kernels on a GPU, their PyTorch twins on the
CPU; the orthogonalisation from the ORTHOGONALIZE registry, by default torch.linalg.qr (cuSOLVER) on a GPU too: the
Householder kernel is a single program (see AUTO_ORTHOGONALIZE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

EXP_BITS = 6
TOP_EXP = 63  # 2^EXP_BITS - 1: NaN only


@dataclass(frozen=True)
class Fmt:
    """A 16-bit format: `signed` (1 sign bit), `m` significand bits, 6 exponent bits with exponent `bias`."""

    signed: bool
    m: int
    bias: int = 31
    """A value with exponent field 1 <= e <= 62 is (1 + mant / 2^m) * 2^(e - bias)."""

    def __post_init__(self) -> None:
        if int(self.signed) + EXP_BITS + self.m != 16:
            raise ValueError(
                f"a 16-bit format needs sign + {EXP_BITS} + m = 16 bits, got {int(self.signed)} + m {self.m}"
            )
        # every value (and the subnormal step the codecs multiply by) is an fp32 normal
        if not 0 <= self.bias <= 127 - self.m:
            raise ValueError(f"exponent bias {self.bias} with m {self.m}: need 0 <= bias <= {127 - self.m} for fp32 "
                             "to hold every value")  # fmt: skip

    @property
    def max(self) -> float:
        return (2 - 2.0**-self.m) * 2.0 ** (TOP_EXP - 1 - self.bias)

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.m)

    @property
    def nan_code(self) -> int:
        """All exponent and significand bits set, sign clear (as an int16 value)."""
        c = (1 << (EXP_BITS + self.m)) - 1
        return c - (1 << 16) if c >= 1 << 15 else c


FMT_169 = Fmt(signed=True, m=9, bias=31)
FMT_0610 = Fmt(signed=False, m=10, bias=60)


# --- references ---------------------------------------------------------------------------------------------------


def quantize_ref(x: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    """The value `x` (fp32) encodes to, as float64: round to nearest even on the format's grid, saturated."""
    x = x.double()
    a = x.abs()
    _, e = torch.frexp(a)  # a = f * 2^e, f in [0.5, 1): floor(log2 a) = e - 1
    step = torch.exp2((e - 1).clamp(min=1 - fmt.bias).double() - fmt.m)  # the grid spacing at a's binade
    q = (torch.round(a / step) * step).clamp(max=fmt.max)  # torch.round: half to even; a / step is exact
    q = torch.where(torch.isinf(a), fmt.max, q)
    q = torch.where(torch.signbit(x), -q, q) if fmt.signed else torch.where(x < 0, 0.0, q)  # -0 keeps its sign
    return torch.where(torch.isnan(x), torch.nan, q)


def encode_ref(x: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    """fp32 -> int16 codes, from the quantized value's binary expansion."""
    q = quantize_ref(x, fmt)
    a = q.abs()
    f, e = torch.frexp(a)  # a = f 2^e
    normal = a >= fmt.min_normal
    exp = torch.where(normal, e - 1 + fmt.bias, 0)
    mant = torch.where(normal, (f * 2.0 ** (fmt.m + 1) - 2**fmt.m), a / fmt.min_subnormal)
    code = (exp.long() << fmt.m) | mant.round().long()
    if fmt.signed:
        code = code | (torch.signbit(q).long() << 15)
    code = torch.where(torch.isnan(q), fmt.nan_code & 0xFFFF, code)
    return (code - ((code >= 1 << 15).long() << 16)).to(torch.int16)


def decode_ref(codes: torch.Tensor, fmt: Fmt) -> torch.Tensor:
    """int16 codes -> fp32 values."""
    c = codes.long() & 0xFFFF
    sign = (c >> 15) & 1 if fmt.signed else torch.zeros_like(c)
    exp = (c >> fmt.m) & (TOP_EXP)
    mant = (c & ((1 << fmt.m) - 1)).double()
    normal = (1 + mant / 2**fmt.m) * torch.exp2((exp - fmt.bias).double())
    value = torch.where(exp == 0, mant * fmt.min_subnormal, normal)
    value = torch.where(sign == 1, -value, value)
    return torch.where(exp == TOP_EXP, torch.nan, value).float()


def orthogonalize_ref(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Q of the QR decomposition of p + eps * I by Householder reflections (LAPACK's conventions), in float64."""
    n, r = p.shape
    a = p.double() + eps * torch.eye(n, r, dtype=torch.float64, device=p.device)
    vs, taus = [], []
    for k in range(r):
        x = a[k:, k].clone()
        sigma = float(x[1:].square().sum())
        if sigma == 0.0:  # nothing below the diagonal: H = I (LAPACK's dlarfg)
            v, tau = torch.zeros_like(x), 0.0
        else:
            alpha = -math.copysign(math.sqrt(float(x[0]) ** 2 + sigma), float(x[0]))
            v = x
            v[0] = x[0] - alpha
            tau = 2.0 / float(v.square().sum())
        a[k:, k:] -= tau * torch.outer(v, v @ a[k:, k:])
        vs.append(v)
        taus.append(tau)
    q = torch.eye(n, r, dtype=torch.float64, device=p.device)
    for k in reversed(range(r)):
        q[k:, :] -= taus[k] * torch.outer(vs[k], vs[k] @ q[k:, :])
    return q.float()


def error_feedback_add_ref(e: torch.Tensor, g: torch.Tensor, scale: float, fmt: Fmt = FMT_169) -> torch.Tensor:
    """New error-buffer codes: enc(dec(e) + g / scale), the sum in fp32."""
    return encode_ref(decode_ref(e, fmt) + g.float() / scale, fmt)


def decompress_update_ref(
    e: torch.Tensor, p: torch.Tensor, q: torch.Tensor, n_nodes: int, fmt: Fmt = FMT_169
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d = p q^T / n_nodes in fp32, new error-buffer codes enc(dec(e) - d), 0 where that is not finite)."""
    d = (p.double() @ q.double().T / n_nodes).float()
    new = decode_ref(e, fmt) - d
    return d, encode_ref(torch.where(torch.isfinite(new), new, 0.0), fmt)


# --- Triton kernels -----------------------------------------------------------------------------------------------


@triton.jit
def _encode(x, M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr):
    """fp32 block -> int32 16-bit patterns (0..65535)."""
    REBIAS: tl.constexpr = 127 - BIAS  # fp32's biased exponent of the format's exponent field 0 (96 for bias 31)
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    big_e = a >> 23  # fp32's biased exponent
    # a normal target (fp32 exponent >= REBIAS + 1, i.e. >= 2^(1 - BIAS)): round the exponent|significand field to
    # M bits (ties to even; a carry moves into the exponent), then rebias 127 -> BIAS
    SHIFT: tl.constexpr = 23 - M
    normal = ((a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT) - (REBIAS << M)
    # a subnormal target: the full significand (a multiple of 2^(big_e - 150)) shifted to multiples of
    # 2^(1 - BIAS - M), ties to even
    sig = (a & 0x7FFFFF) | tl.where(big_e > 0, 0x800000, 0)
    sh = tl.minimum(tl.maximum(151 - BIAS - M - tl.maximum(big_e, 1), 1), 31)  # (clamped where unused)
    sub = (sig + ((1 << (sh - 1)) - 1) + ((sig >> sh) & 1)) >> sh
    code = tl.where(big_e > REBIAS, normal, sub)
    code = tl.minimum(code, (63 << M) - 1)  # saturate: beyond the largest, and +-inf
    if SIGNED:
        code = code | (sign << 15)
    else:
        code = tl.where(sign == 1, 0, code)
    return tl.where(a > 0x7F800000, (1 << (6 + M)) - 1, code)  # NaN


@triton.jit
def _decode(c, M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr):
    """int32 16-bit patterns block -> fp32."""
    REBIAS: tl.constexpr = 127 - BIAS
    c = c & 0xFFFF
    if SIGNED:
        sign = (c >> 15) & 1
        c = c & 0x7FFF
    else:
        sign = c * 0
    exp = c >> M
    mant = c & ((1 << M) - 1)
    normal = ((sign << 31) | ((exp + REBIAS) << 23) | (mant << (23 - M))).to(tl.float32, bitcast=True)
    STEP: tl.constexpr = (REBIAS + 1 - M) << 23  # fp32 bits of 2^(1 - BIAS - M), the subnormal step
    sub = mant.to(tl.float32) * tl.full((), STEP, tl.int32).to(tl.float32, bitcast=True)
    sub = (sub.to(tl.int32, bitcast=True) | (sign << 31)).to(tl.float32, bitcast=True)  # (-x would lose -0)
    value = tl.where(exp == 0, sub, normal)
    return tl.where(exp == 63, float("nan"), value)


@triton.jit
def _encode_kernel(X, C, N, M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors beyond 2^31 elements
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    tl.store(C + offs, _encode(x, M, SIGNED, BIAS).to(tl.int16), mask=offs < N)


@triton.jit
def _decode_kernel(C, X, N, M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(C + offs, mask=offs < N, other=0).to(tl.int32)
    tl.store(X + offs, _decode(c, M, SIGNED, BIAS), mask=offs < N)


@triton.jit
def _error_feedback_add_kernel(
    E, G, N, inv_scale, M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    e = _decode(tl.load(E + offs, mask=mask, other=0).to(tl.int32), M, SIGNED, BIAS)
    g = tl.load(G + offs, mask=mask, other=0.0)
    tl.store(E + offs, _encode(e + g * inv_scale, M, SIGNED, BIAS).to(tl.int16), mask=mask)


@triton.jit
def _decompress_update_kernel(
    E, P, Q, D, m, n, r, inv_nodes,
    M: tl.constexpr, SIGNED: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of d = p q^T / n_nodes (p (m, r), q (n, r), row-major) and of e -= d."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * n beyond 2^31
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(P + offs_m[:, None] * r + offs_k[None, :], mask=(offs_m[:, None] < m) & (offs_k[None, :] < r),
                    other=0.0)  # fmt: skip
        b = tl.load(Q + offs_n[None, :] * r + offs_k[:, None], mask=(offs_n[None, :] < n) & (offs_k[:, None] < r),
                    other=0.0)  # fmt: skip
        acc += tl.dot(a, b, input_precision="ieee")
    d = acc * inv_nodes
    mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    idx = offs_m[:, None] * n + offs_n[None, :]
    tl.store(D + idx, d, mask=mask)
    e = _decode(tl.load(E + idx, mask=mask, other=0).to(tl.int32), M, SIGNED, BIAS) - d
    e = tl.where(e - e == 0.0, e, 0.0)  # not finite: zeroed (App. E.2)
    tl.store(E + idx, _encode(e, M, SIGNED, BIAS).to(tl.int16), mask=mask)


@triton.jit
def _reflect(M, V, k, tau, n, r, col0, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """M[k:, col0:] -= tau v (v^T M[k:, :]) for the reflection vector v in column k of V (M, V (n, r) row-major):
    one pass for w = v^T M, one for the update, each ending at a barrier (the same program reads what it wrote)."""
    cols = tl.arange(0, BLOCK_R)
    w = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i0 in range(k, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        v = tl.load(V + rows * r + k, mask=rows < n, other=0.0)
        tile = tl.load(M + rows[:, None] * r + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < r),
                       other=0.0)  # fmt: skip
        w += tl.sum(v[:, None] * tile, axis=0)
    tl.debug_barrier()
    for i0 in range(k, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        v = tl.load(V + rows * r + k, mask=rows < n, other=0.0)
        ptrs = M + rows[:, None] * r + cols[None, :]
        tmask = (rows[:, None] < n) & (cols[None, :] < r) & (cols[None, :] >= col0)
        tile = tl.load(ptrs, mask=tmask, other=0.0)
        tl.store(ptrs, tile - tau * v[:, None] * w[None, :], mask=tmask)
    tl.debug_barrier()


@triton.jit
def _householder_kernel(A, V, TAU, Q, n, r, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """In place on A (n, r) fp32 row-major (p + eps I): the reflections' vectors into V (n, r) and factors into
    TAU (r,), then Q (n, r) = H_0 ... H_{r-1} I. One program; the columns are one tile of BLOCK_R >= r."""
    for k in range(0, r):
        # column k below the diagonal: sigma = sum of squares under the diagonal element x0
        x0 = tl.load(A + k * r + k)
        sigma = x0 * 0.0
        for i0 in range(k + 1, n, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            x = tl.load(A + rows * r + k, mask=rows < n, other=0.0)
            sigma += tl.sum(x * x, axis=0)
        norm = tl.sqrt(x0 * x0 + sigma)
        alpha = tl.where(x0 >= 0, -norm, norm)
        v0 = x0 - alpha
        denom = v0 * v0 + sigma
        tau = tl.where(sigma == 0.0, 0.0, 2.0 / tl.where(denom > 0.0, denom, 1.0))
        tl.store(TAU + k, tau)
        # v = (v0, x[1:]) into V; then A[k:, k:] -= tau v (v^T A[k:, :])
        for i0 in range(k, n, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            v = tl.load(A + rows * r + k, mask=rows < n, other=0.0)
            tl.store(V + rows * r + k, tl.where(rows == k, v0, v), mask=rows < n)
        tl.debug_barrier()
        _reflect(A, V, k, tau, n, r, k, BLOCK_N, BLOCK_R)
    # Q = H_0 (H_1 (... (H_{r-1} I))): Q starts as I (n, r), written by the launcher
    for kk in range(0, r):
        k = r - 1 - kk
        _reflect(Q, V, k, tl.load(TAU + k), n, r, 0, BLOCK_N, BLOCK_R)


# --- launchers ----------------------------------------------------------------------------------------------------

BLOCK = 1024


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _check_codes(c: torch.Tensor, what: str) -> None:
    if c.dtype != torch.int16 or not c.is_contiguous():
        raise ValueError(f"{what}: expected contiguous int16 codes, got {c.dtype} (contiguous: {c.is_contiguous()})")


def encode(x: torch.Tensor, fmt: Fmt = FMT_169) -> torch.Tensor:
    """fp32 (any shape) -> int16 codes of the same shape."""
    if x.dtype != torch.float32:
        raise ValueError(f"encode: expected fp32, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    if x.numel():
        _encode_kernel[_grid(x.numel())](x, out, x.numel(), M=fmt.m, SIGNED=fmt.signed, BIAS=fmt.bias,
                                         BLOCK=BLOCK)  # fmt: skip
    return out


def decode(codes: torch.Tensor, fmt: Fmt = FMT_169) -> torch.Tensor:
    """int16 codes (any shape) -> fp32 of the same shape."""
    _check_codes(codes, "decode")
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    if codes.numel():
        _decode_kernel[_grid(codes.numel())](codes, out, codes.numel(), M=fmt.m, SIGNED=fmt.signed, BIAS=fmt.bias,
                                             BLOCK=BLOCK)  # fmt: skip
    return out


def error_feedback_add_(e: torch.Tensor, g: torch.Tensor, scale: float, fmt: Fmt = FMT_169) -> torch.Tensor:
    """In place: e <- enc(dec(e) + g / scale); returns e."""
    _check_codes(e, "error_feedback_add_: e")
    if g.shape != e.shape or g.dtype != torch.float32:
        raise ValueError(f"error_feedback_add_: g must be fp32 of e's shape {tuple(e.shape)}, got {g.dtype} "
                         f"{tuple(g.shape)}")  # fmt: skip
    g = g.contiguous()
    if e.numel():
        _error_feedback_add_kernel[_grid(e.numel())](e, g, e.numel(), 1.0 / scale, M=fmt.m, SIGNED=fmt.signed,
                                                     BIAS=fmt.bias, BLOCK=BLOCK)  # fmt: skip
    return e


def decompress_update_(
    e: torch.Tensor, p: torch.Tensor, q: torch.Tensor, n_nodes: int, fmt: Fmt = FMT_169
) -> torch.Tensor:
    """In place on the error buffer e (m, n); returns d = p q^T / n_nodes (m, n) fp32."""
    _check_codes(e, "decompress_update_: e")
    if e.dim() != 2 or p.shape != (e.shape[0], p.shape[1]) or q.shape != (e.shape[1], p.shape[1]):
        raise ValueError(f"decompress_update_: e (m, n), p (m, r), q (n, r); got {tuple(e.shape)}, {tuple(p.shape)}, "
                         f"{tuple(q.shape)}")  # fmt: skip
    if p.dtype != torch.float32 or q.dtype != torch.float32:
        raise ValueError(f"decompress_update_: p and q must be fp32, got {p.dtype}, {q.dtype}")
    m, n, r = e.shape[0], e.shape[1], p.shape[1]
    p, q = p.contiguous(), q.contiguous()
    d = torch.empty(m, n, dtype=torch.float32, device=e.device)
    bm, bn, bk = 32, 32, max(16, min(64, triton.next_power_of_2(r)))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _decompress_update_kernel[grid](e, p, q, d, m, n, r, 1.0 / n_nodes, M=fmt.m, SIGNED=fmt.signed, BIAS=fmt.bias,
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)  # fmt: skip
    return d


MAX_RANK = 1024


def orthogonalize(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Q (n, r) of p + eps * I (n, r), n >= r, by Householder reflections; p is not modified."""
    if p.dim() != 2 or p.dtype != torch.float32:
        raise ValueError(f"orthogonalize: expected a 2-d fp32 matrix, got {p.dtype} {tuple(p.shape)}")
    n, r = p.shape
    if not 1 <= r <= min(n, MAX_RANK):
        raise ValueError(f"orthogonalize: need 1 <= r <= min(n, {MAX_RANK}) for p (n, r), got {tuple(p.shape)}")
    a = p + eps * torch.eye(n, r, dtype=p.dtype, device=p.device)  # a fresh contiguous work copy
    v = torch.zeros_like(a)
    tau = torch.empty(r, dtype=torch.float32, device=p.device)
    out = torch.eye(n, r, dtype=torch.float32, device=p.device)
    block_r = triton.next_power_of_2(r)
    _householder_kernel[(1,)](a, v, tau, out, n, r, BLOCK_N=max(1, min(64, 4096 // block_r)), BLOCK_R=block_r)
    return out


# --- dispatch: the kernels on a GPU, PyTorch on the CPU ----------------------------------------------------------


def _rne_shift(v: torch.Tensor, sh: torch.Tensor | int) -> torch.Tensor:
    """v >> sh rounded to nearest, ties to even (int32 v >= 0, 1 <= sh <= 31)."""
    return (v + ((1 << (sh - 1)) - 1) + ((v >> sh) & 1)) >> sh


def encode_torch(x: torch.Tensor, fmt: Fmt = FMT_169) -> torch.Tensor:
    """The kernels' integer algorithm in PyTorch (the CPU has no Triton backend): bit-identical to encode_ref.
    In place where it can: the normal path on every element, the subnormal one on the few that need it."""
    m, rebias = fmt.m, 127 - fmt.bias
    bits = x.float().contiguous().view(torch.int32)
    a = bits & 0x7FFFFFFF
    code = _rne_shift(a, 23 - m).sub_(rebias << m).clamp_(max=(63 << m) - 1)  # normal targets; saturated
    small = a < ((rebias + 1) << 23)  # below 2^(1 - bias) (zeros included): subnormal targets
    if bool(small.any()):
        s_a = a[small]
        big_e = s_a >> 23
        sig = (s_a & 0x7FFFFF) | ((big_e > 0).int() << 23)
        code[small] = _rne_shift(sig, (151 - fmt.bias - m - big_e.clamp(min=1)).clamp(1, 31))
    if fmt.signed:
        code |= (bits >> 16) & 0x8000  # the sign bit, moved from bit 31 to bit 15
    else:
        code.masked_fill_(bits < 0, 0)
    code.masked_fill_(a > 0x7F800000, (1 << (6 + m)) - 1)  # NaN
    return code.to(torch.int16)  # (patterns >= 2^15 wrap to the negative int16 of the same bits)


def decode_torch(codes: torch.Tensor, fmt: Fmt = FMT_169) -> torch.Tensor:
    """The kernels' decoding in PyTorch: bit-identical to decode_ref. Like the kernel, it takes int16 codes only
    (fp32 holding code values, as torch's Optimizer.load_state_dict makes of them, is an error, not a decode)."""
    if codes.dtype != torch.int16:
        raise ValueError(f"decode_torch: expected int16 codes, got {codes.dtype}")
    m = fmt.m
    c = codes.int() & 0xFFFF
    sign = (c >> 15) & 1 if fmt.signed else torch.zeros_like(c)
    c = c & 0x7FFF if fmt.signed else c
    exp, mant = c >> m, c & ((1 << m) - 1)
    normal = ((sign << 31) | ((exp + 127 - fmt.bias) << 23) | (mant << (23 - m))).view(torch.float32)
    sub = (mant.float() * fmt.min_subnormal).view(torch.int32) | (sign << 31)
    value = torch.where(exp == 0, sub.view(torch.float32), normal)
    return torch.where(exp == 63, torch.nan, value)


@dataclass(frozen=True)
class Ops:
    """One implementation of the five operations, with the launchers' signatures (the `_` ones in place)."""

    encode: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    orthogonalize: Callable[..., torch.Tensor]
    error_feedback_add_: Callable[..., torch.Tensor]
    decompress_update_: Callable[..., torch.Tensor]


def _torch_error_feedback_add_(e: torch.Tensor, g: torch.Tensor, scale: float, fmt: Fmt = FMT_169) -> torch.Tensor:
    return e.copy_(encode_torch(decode_torch(e, fmt) + g.float() / scale, fmt))


def _torch_decompress_update_(e: torch.Tensor, p: torch.Tensor, q: torch.Tensor, n_nodes: int, fmt: Fmt = FMT_169):
    d = (p.float() @ q.float().T) / n_nodes
    new = decode_torch(e, fmt) - d
    e.copy_(encode_torch(torch.where(torch.isfinite(new), new, 0.0), fmt))
    return d


def torch_qr_orthogonalize(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Q (n, r) of p + eps * I (n, r), n >= r, by torch.linalg.qr: Householder QR (geqrf + orgqr) by LAPACK on the
    CPU, cuSOLVER on a GPU, with LAPACK's sign conventions: the same Q as orthogonalize_ref (tested), in fp32."""
    if p.dim() != 2 or p.dtype != torch.float32:
        raise ValueError(f"torch_qr_orthogonalize: expected a 2-d fp32 matrix, got {p.dtype} {tuple(p.shape)}")
    n, r = p.shape
    if not 1 <= r <= n:
        raise ValueError(f"torch_qr_orthogonalize: need 1 <= r <= n for p (n, r), got {tuple(p.shape)}")
    return torch.linalg.qr(p + eps * torch.eye(n, r, dtype=torch.float32, device=p.device)).Q


KERNELS = Ops(encode, decode, orthogonalize, error_feedback_add_, decompress_update_)
TORCH = Ops(encode_torch, decode_torch, torch_qr_orthogonalize, _torch_error_feedback_add_, _torch_decompress_update_)

ORTHOGONALIZE: dict[str, Callable[..., torch.Tensor]] = {
    "householder": orthogonalize,
    "torch_qr": torch_qr_orthogonalize,
}
"""The orthogonalisations of P, one signature (p (n, r) fp32, eps) -> Q (n, r): the Triton Householder kernel (one
program, grid (1,)) or torch.linalg.qr (cuSOLVER on a GPU, LAPACK on the CPU); both give LAPACK's Q."""
AUTO_ORTHOGONALIZE = "torch_qr"
"""What `orthogonalize = "auto"` picks, on a GPU too: the Householder kernel is one Triton program, serial over the
r columns, and one program cannot fill an H100 at a 12B shard (1984 x 112), while cuSOLVER's blocked QR can; to be
revisited when tools/bench_powersgd_kernels.py has measured both on the GPU. (The CPU has no Triton backend.)"""


def ops_for(device: torch.device | str, orthogonalize: str = "auto") -> Ops:
    """The Triton kernels on a CUDA device; on the CPU, which has no Triton backend, PyTorch (the kernels'
    integer codec, LAPACK's QR): the tests hold both to the references, the codecs bit for bit. `orthogonalize`
    names an entry of ORTHOGONALIZE, or "auto" (AUTO_ORTHOGONALIZE)."""
    if orthogonalize != "auto" and orthogonalize not in ORTHOGONALIZE:
        raise ValueError(f"orthogonalize must be auto or one of {sorted(ORTHOGONALIZE)}, got {orthogonalize!r}")
    ops = KERNELS if torch.device(device).type == "cuda" else TORCH
    name = AUTO_ORTHOGONALIZE if orthogonalize == "auto" else orthogonalize
    return replace(ops, orthogonalize=ORTHOGONALIZE[name])
