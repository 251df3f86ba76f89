"""PowerSGD's Triton kernels against their PyTorch references: the 1-6-9 and 0-6-10 formats at their exponent
biases (31 and 60) and at other biases (every code, ties, the edges, saturation, NaN), Householder
orthogonalisation against its reference and LAPACK's QR, and the two error-feedback updates; under the interpreter
on the CPU at odd shapes, and at 12B shard shapes under the `gpu` marker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from kernels.powersgd import (
    FMT_0610,
    FMT_169,
    ORTHOGONALIZE,
    TORCH,
    Fmt,
    decode,
    decode_ref,
    decode_torch,
    decompress_update_,
    decompress_update_ref,
    encode,
    encode_ref,
    encode_torch,
    error_feedback_add_,
    error_feedback_add_ref,
    ops_for,
    orthogonalize,
    orthogonalize_ref,
    quantize_ref,
    torch_qr_orthogonalize,
)
from tests.conftest import REPO

FMTS = pytest.mark.parametrize(
    "fmt",
    [FMT_169, FMT_0610, Fmt(signed=False, m=10, bias=31), Fmt(signed=True, m=9, bias=60)],
    ids=["1-6-9", "0-6-10", "0-6-10 bias 31", "1-6-9 bias 60"],  # (the codecs take any bias, not only the two)
)
CODECS = pytest.mark.parametrize(
    "encode, decode", [(encode, decode), (encode_torch, decode_torch)], ids=["triton", "torch (the CPU's)"]
)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _all_codes() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)


def test_format_ranges() -> None:
    """1-6-9 (gradient-sized, signed): bias 31, normal from 2^-30 to 4.29e9. 0-6-10 (Adam's variance, clipped to 5):
    bias 60, the largest bias whose top value still holds the clip, normal from 2^-59 = (2^-29.5)^2 (the first
    moment's floor, squared), subnormal to 2^-69."""
    assert FMT_169.bias == 31 and FMT_169.max == (2 - 2**-9) * 2**31  # ~4.29e9
    assert FMT_169.min_normal == 2**-30 and FMT_169.min_subnormal == 2**-39
    assert FMT_0610.bias == 60 and FMT_0610.max == (2 - 2**-10) * 2**2 == 7.99609375
    assert Fmt(signed=False, m=10, bias=61).max < 5.0 < FMT_0610.max  # App. B.2's clip fits, one bias up it would not
    assert FMT_0610.min_normal == 2**-59 and FMT_0610.min_subnormal == 2**-69
    assert FMT_0610.min_normal**0.5 == 2**-29.5  # sqrt(v)'s floor beside |m|'s 2^-30
    for fmt in (FMT_169, FMT_0610):
        values = decode_ref(_all_codes(), fmt)
        finite = values[~values.isnan()]
        assert float(finite.max()) == fmt.max and float(finite[finite > 0].min()) == fmt.min_subnormal
        assert int(values.isnan().sum()) == 2**fmt.m * (2 if fmt.signed else 1)  # the top exponent only
    signed, unsigned = decode_ref(_all_codes(), FMT_169), decode_ref(_all_codes(), FMT_0610)
    assert float(signed[~signed.isnan()].min()) == -FMT_169.max
    assert float(unsigned[~unsigned.isnan()].min()) == 0.0  # no sign bit


@CODECS
@FMTS
def test_every_code_decodes_as_the_reference_and_round_trips(fmt, encode, decode) -> None:
    codes = _all_codes()
    values = decode(codes, fmt)
    assert _same(values, decode_ref(codes, fmt))
    finite = ~values.isnan()
    assert torch.equal(encode(values[finite], fmt), codes[finite])  # -0 included (1-6-9)
    assert torch.equal(encode_ref(values[finite], fmt), codes[finite])
    assert int(encode(torch.tensor([float("nan")]), fmt)) == fmt.nan_code


@CODECS
@FMTS
def test_encode_rounds_to_nearest_even_like_the_reference(fmt, encode, decode) -> None:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(20011, generator=g) * torch.exp2(torch.randint(-48, 36, (20011,), generator=g).float())
    grid = decode_ref(_all_codes(), fmt)
    grid = grid[~grid.isnan()].unique()  # ascending representable values
    mids = ((grid[1:].double() + grid[:-1].double()) / 2).float()  # exact ties where fp32 holds them
    mids = mids[(mids.double() == (grid[1:].double() + grid[:-1].double()) / 2)]
    x = torch.cat([wide, mids, torch.nextafter(mids, torch.tensor(float("inf"))), torch.nextafter(mids, grid[:-1])])
    assert torch.equal(encode(x, fmt), encode_ref(x, fmt))
    q = decode(encode(x, fmt), fmt).double()
    expect = quantize_ref(x, fmt)
    assert _same(q, expect)
    # nearest: no representable value is closer to x than the one it encodes to
    idx = torch.searchsorted(grid.double(), x.double().clamp(grid[0].item(), grid[-1].item()))
    lo, hi = grid[(idx - 1).clamp(min=0)].double(), grid[idx.clamp(max=len(grid) - 1)].double()
    best = torch.minimum((x.double() - lo).abs(), (x.double() - hi).abs())
    inside = (x.double() >= grid[0].item()) & (x.double() <= grid[-1].item())
    assert bool(((q - x.double()).abs()[inside] <= best[inside]).all())
    # ties go to the even significand
    tie_codes = encode(mids, fmt).long() & ((1 << fmt.m) - 1)
    assert bool((tie_codes % 2 == 0).all())


@CODECS
@FMTS
def test_edges_encode_to_their_codes_and_back(fmt, encode, decode) -> None:
    """The largest value, the smallest normal, the largest and smallest subnormal, saturation and NaN, by code."""
    m, top = fmt.m, (1 << fmt.m) - 1
    values = [fmt.max, fmt.min_normal, fmt.min_normal - fmt.min_subnormal, fmt.min_subnormal, 0.0, fmt.max * 1.5,
              float("inf"), float("nan")]  # fmt: skip
    codes = [(62 << m) | top, 1 << m, top, 1, 0, (62 << m) | top, (62 << m) | top, fmt.nan_code]
    codes = [c - (1 << 16) if c >= 1 << 15 else c for c in codes]  # as int16 values
    x = torch.tensor(values, dtype=torch.float32)
    assert encode(x, fmt).tolist() == codes
    assert encode_ref(x, fmt).tolist() == codes
    expect = torch.tensor(values[:5] + [fmt.max, fmt.max, float("nan")])
    assert _same(decode(torch.tensor(codes, dtype=torch.int16), fmt), expect)
    assert _same(decode_ref(torch.tensor(codes, dtype=torch.int16), fmt), expect)
    # just below the smallest normal rounds up into it; half the smallest subnormal is a tie, to even (0)
    near = torch.tensor([fmt.min_normal - fmt.min_subnormal / 2, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75])
    assert encode(near, fmt).tolist() == [1 << m, 0, 1]


def test_formats_reject_biases_fp32_cannot_hold() -> None:
    with pytest.raises(ValueError, match="exponent bias 118 with m 10"):
        Fmt(signed=False, m=10, bias=118)  # the smallest subnormal 2^-127 would be an fp32 subnormal
    with pytest.raises(ValueError, match=r"sign \+ 6 \+ m = 16"):
        Fmt(signed=True, m=10)


@CODECS
@FMTS
def test_saturation_nan_and_signs(fmt, encode, decode) -> None:
    big = torch.tensor([fmt.max, fmt.max * 1.0001, 3e38, float("inf")])
    assert decode(encode(big, fmt), fmt).tolist() == [fmt.max] * 4  # infinities clamped to the largest value
    neg = decode(encode(-big, fmt), fmt).tolist()
    assert neg == ([-fmt.max] * 4 if fmt.signed else [0.0] * 4)  # keeping the sign; unsigned: negatives to 0
    tiny = torch.tensor([fmt.min_subnormal / 2, fmt.min_subnormal * 0.5001, 1e-45, -0.0])
    got = decode(encode(tiny, fmt), fmt)
    assert got[:3].tolist() == [0.0, fmt.min_subnormal, 0.0]  # the tie at half the smallest goes to even (0)
    assert torch.signbit(got[3]) == fmt.signed
    assert decode(encode(torch.tensor([float("nan")]), fmt), fmt).isnan().all()


@pytest.mark.parametrize("shape", [(37, 5), (8, 8), (130, 17), (3, 1), (65, 64)])
def test_orthogonalize_matches_reference_and_lapack(shape) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    p = torch.randn(shape, generator=g) * 3
    q = orthogonalize(p)
    ref = orthogonalize_ref(p)
    lapack = torch.linalg.qr(p.double() + 1e-6 * torch.eye(*shape, dtype=torch.float64)).Q
    assert (ref.double() - lapack).abs().max() < 1e-6  # the reference is LAPACK's Q, signs included
    assert (q - ref).abs().max() < 2e-5
    assert (TORCH.orthogonalize(p) - ref).abs().max() < 2e-5  # the CPU's (LAPACK's) Q
    r = shape[1]
    assert (q.T @ q - torch.eye(r)).abs().max() < 2e-5


@pytest.mark.parametrize("shape", [(37, 5), (130, 17), (3, 1), (65, 64), (1984 // 16, 7)])
def test_torch_qr_is_the_default_orthogonalisation_with_the_references_q(shape) -> None:
    """`ops_for` picks the orthogonalisation from a registry: torch.linalg.qr by default on a GPU too (the Householder
    kernel is one program), with the same eps * I and LAPACK's signs, so the same Q as the reference."""
    assert ops_for("cuda").orthogonalize is torch_qr_orthogonalize is ops_for("cpu").orthogonalize
    assert ops_for("cuda", "householder").orthogonalize is orthogonalize is ORTHOGONALIZE["householder"]
    assert ops_for("cuda").encode is encode and ops_for("cpu").encode is encode_torch  # the rest as before
    g = torch.Generator().manual_seed(7 * sum(shape))
    p = torch.randn(shape, generator=g)
    ref = orthogonalize_ref(p, 1e-6)
    for name, fn in ORTHOGONALIZE.items():
        assert (fn(p, 1e-6) - ref).abs().max() < 2e-5, name
    with pytest.raises(ValueError, match="orthogonalize must be auto or one of"):
        ops_for("cuda", "cholesky_qr")
    with pytest.raises(ValueError, match="1 <= r <= n"):
        torch_qr_orthogonalize(torch.randn(3, 5))


def test_orthogonalize_rank_deficient_p_is_regularised_by_eps() -> None:
    """A P with zero and repeated columns (a zero gradient, a rank-1 error buffer) still gives orthonormal Q."""
    p = torch.zeros(29, 6)
    p[:, 1] = torch.arange(29.0)
    p[:, 2] = p[:, 1]
    q = orthogonalize(p)
    assert torch.isfinite(q).all() and (q.T @ q - torch.eye(6)).abs().max() < 2e-5
    a = p + 1e-6 * torch.eye(29, 6)
    assert (a - q @ (q.T @ a)).abs().max() <= 1e-5 * a.abs().max()  # Q spans p + eps I
    # the well-conditioned columns match the reference; the ones eps alone separates are fp32 rounding noise
    assert (q[:, :2] - orthogonalize_ref(p)[:, :2]).abs().max() < 2e-5


def test_orthogonalize_leaves_p_and_rejects_bad_shapes() -> None:
    p = torch.randn(10, 3)
    before = p.clone()
    orthogonalize(p)
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="min\\(n"):
        orthogonalize(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-d fp32"):
        orthogonalize(torch.randn(5, 3, dtype=torch.float64))


def test_error_feedback_add_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    e = encode(torch.randn(33, 45, generator=g) * 1e-3)
    grad = torch.randn(33, 45, generator=g) * 2**14  # carries a block's gradient scale
    out = error_feedback_add_(e.clone(), grad, 2.0**14)
    assert torch.equal(out, error_feedback_add_ref(e, grad, 2.0**14))
    assert torch.equal(TORCH.error_feedback_add_(e.clone(), grad, 2.0**14), out)
    with pytest.raises(ValueError, match="fp32 of e's shape"):
        error_feedback_add_(e, grad[:, :3], 1.0)


def test_decompress_update_matches_reference_and_zeroes_non_finite() -> None:
    g = torch.Generator().manual_seed(2)
    m, n, r = 45, 33, 7
    e = encode(torch.randn(m, n, generator=g))
    e[3, 4] = FMT_169.nan_code  # a non-finite error entry is zeroed (App. E.2)
    p, q = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
    got_e = e.clone()
    d = decompress_update_(got_e, p, q, n_nodes=3)
    ref_d, ref_e = decompress_update_ref(e, p, q, 3)
    assert (d - ref_d).abs().max() <= 1e-5 * ref_d.abs().max()
    # the new buffer: equal codes, or (d rounded differently in fp32) one step of the format apart
    diff = (decode(got_e) - decode(ref_e)).abs()
    assert (diff <= decode(ref_e).abs() * 2**-9 + 1e-12).all() and int(got_e[3, 4]) == 0 == int(ref_e[3, 4])
    cpu_e = e.clone()
    assert (TORCH.decompress_update_(cpu_e, p, q, 3) - ref_d).abs().max() <= 1e-5 * ref_d.abs().max()
    assert (decode(cpu_e) - decode(ref_e)).abs().max() <= float(decode(ref_e).abs().max()) * 2**-9
    with pytest.raises(ValueError, match="e \\(m, n\\), p \\(m, r\\), q \\(n, r\\)"):
        decompress_update_(e, p, p, 3)


def test_decode_rejects_non_codes() -> None:
    """The CPU's decode refuses what the Triton launcher refuses: fp32 holding code values (what torch's
    Optimizer.load_state_dict makes of int16 state) is not a code tensor."""
    for dec in (decode, decode_torch):
        with pytest.raises(ValueError, match="int16 codes"):
            dec(torch.zeros(4, dtype=torch.int32))
        with pytest.raises(ValueError, match="int16 codes"):
            dec(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="expected fp32"):
        encode(torch.zeros(4, dtype=torch.float16))


_COMPILE = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.powersgd as ps

fmt = ps.FMT_169
consts = {"M": fmt.m, "SIGNED": fmt.signed, "BIAS": fmt.bias}
kernels = {
    "encode": (ps._encode_kernel, {"X": "*fp32", "C": "*i16", "N": "i32"}, {"BLOCK": ps.BLOCK}),
    "decode": (ps._decode_kernel, {"C": "*i16", "X": "*fp32", "N": "i32"}, {"BLOCK": ps.BLOCK}),
    "error_feedback_add": (ps._error_feedback_add_kernel, {"E": "*i16", "G": "*fp32", "N": "i32", "inv_scale": "fp32"},
                           {"BLOCK": ps.BLOCK}),
    "decompress_update": (ps._decompress_update_kernel, {"E": "*i16", "P": "*fp32", "Q": "*fp32", "D": "*fp32",
                          "m": "i32", "n": "i32", "r": "i32", "inv_nodes": "fp32"},
                          {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}),
}
out = {}
for name, (fn, sig, meta) in kernels.items():
    c = {**consts, **meta}
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in c}}, c)
    out[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
json.dump(out, sys.stdout)
"""


def _program_id_uses(ttir: str, axis: str = "x") -> list[str]:
    """The TTIR operations that use `tl.program_id` of `axis` (its SSA value)."""
    (pid,) = re.findall(rf"(%[\w.]+) = tt.get_program_id {axis} : i32", ttir)
    uses = re.compile(rf"{re.escape(pid)}(?![\w.])")
    return [ln.strip() for ln in ttir.splitlines() if uses.search(ln) and "get_program_id" not in ln]


def test_offsets_are_int64_in_the_kernels_compiled_for_hopper(tmp_path) -> None:
    """Beyond 2^31 elements (a 12B model's flat moments on one GPU, or a shard's m x n) `program_id * BLOCK` in
    int32 wraps. Compiled for sm_90 on the CPU with Triton's own compiler (no interpreter, no GPU): in each 1-D
    kernel, and for the decompression's rows, the program id is only ever sign-extended to i64 before use."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ttirs = json.loads(proc.stdout)
    assert sorted(ttirs) == ["decode", "decompress_update", "encode", "error_feedback_add"]
    for name, ttir in ttirs.items():
        uses = _program_id_uses(ttir)
        assert uses and all(re.search(r"arith.extsi %[\w.]+ : i32 to i64", u) for u in uses), (name, uses)


GPU = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("MEGADALLE_REQUIRE_GPU") != "1", reason="needs a CUDA device"
)


@pytest.mark.gpu
@GPU
def test_gpu_12b_shard_shapes() -> None:
    """The 12B model's MLP shard (3968 x 4 * 3968 / 8) at rank 112 a GPU: codec, orthogonalisation, updates."""
    m, n, r = 3968, 1984, 112
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, generator=g, device="cuda") * 1e-3
    for fmt in (FMT_169, FMT_0610):
        assert torch.equal(encode(x, fmt).cpu(), encode_ref(x.cpu(), fmt))
    p = torch.randn(n, r, generator=g, device="cuda")
    q = orthogonalize(p)
    assert (q.cpu() - orthogonalize_ref(p.cpu())).abs().max() < 1e-4
    q = ops_for("cuda").orthogonalize(p)  # cuSOLVER's QR: LAPACK's signs
    assert (q.cpu() - orthogonalize_ref(p.cpu())).abs().max() < 1e-4
    e = encode(x)
    pm, qm = torch.randn(m, r, generator=g, device="cuda"), torch.randn(n, r, generator=g, device="cuda")
    d = decompress_update_(e, pm, qm, 16)
    ref_d, _ = decompress_update_ref(encode(x).cpu(), pm.cpu(), qm.cpu(), 16)
    assert (d.cpu() - ref_d).abs().max() <= 1e-4 * ref_d.abs().max()
