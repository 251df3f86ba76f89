"""The Triton block-sparse attention kernels against their PyTorch reference, forward and backward: under the
interpreter on the CPU at small odd shapes (conftest sets TRITON_INTERPRET=1 there), and at the paper's stream
under the `gpu` marker. Tolerance follows flash-attention: the kernel's error against the fp32 reference is at
most twice PyTorch's own error in the same low precision (plus a floor for fp32)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_ref, block_table
from megadalle.models.sparsity import EMPTY, FULL, MaskSpec

KINDS = ["row", "column", "conv", "causal"]
INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors under the interpreter; on a GPU the gpu tests run"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _spec(kind: str, t: int = 13, h: int = 6, w: int = 7) -> MaskSpec:
    return MaskSpec(kind, t, h, w, kernel=3 if kind == "conv" else 11)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_() for _ in range(3)]


def _run(fn, q, k, v, do) -> tuple[torch.Tensor, ...]:
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return (out.detach(), *(x.grad.detach() for x in (q, k, v)))


def _lowp_ref(spec: MaskSpec):
    """PyTorch in the inputs' own precision (its error is the yardstick)."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense().to(q.device))

    return fn


def _compare(spec: MaskSpec, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", block: int | None = None):
    q, k, v = _inputs(shape, dtype, device)
    do = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    got = _run(lambda *x: block_sparse_attention(*x, spec, block), q, k, v, do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _run(lambda *x: block_sparse_attention_ref(*x, spec), q32, k32, v32, do.float())
    low = _run(_lowp_ref(spec), q, k, v, do)
    for name, g, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.float() - r).abs().max().item()
        yardstick = (lo.float() - r).abs().max().item()
        assert err <= 2 * yardstick + 1e-5, f"{spec.kind} {dtype} {name}: error {err:.3g}, PyTorch's {yardstick:.3g}"


@INTERPRETER
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_match_reference(kind, dtype):
    """Text 13 + a 6x7 grid (N = 55: no boundary is block-aligned), blocks of 16, 3 heads, batch 2."""
    _compare(_spec(kind), (2, 3, 55, 32), dtype)


@INTERPRETER
@pytest.mark.parametrize("hd", [16, 24, 64, 128])
def test_head_dims(hd):
    """hd 24 pads the head dimension inside the kernel; 64 and 128 are the paper's and a wide one."""
    _compare(_spec("row", t=5, h=4, w=5), (1, 1, 25, hd), torch.float32)


@INTERPRETER
def test_no_text_and_batch_of_heads():
    _compare(MaskSpec("conv", 0, 5, 9, kernel=5), (3, 5, 45, 32), torch.float16, block=32)


@INTERPRETER
def test_strided_views_are_read_in_place():
    """q, k, v as the transformer makes them (slices of one (B, N, 3 D) projection, heads transposed) and a
    transposed dO: the kernels read them through their strides, no copy, with the reference's result."""
    spec = _spec("conv")
    B, nh, N, hd = 2, 3, spec.n, 32
    qkv = torch.randn(B, N, 3 * nh * hd, generator=torch.Generator().manual_seed(0)).requires_grad_()
    q, k, v = (x.view(B, N, nh, hd).transpose(1, 2) for x in qkv.split(nh * hd, dim=2))  # (B, nh, N, hd) views
    assert not q.is_contiguous() and q.stride() == k.stride()
    do = torch.randn(B, N, nh, hd, generator=torch.Generator().manual_seed(1)).transpose(1, 2)  # (B, nh, N, hd)
    out = block_sparse_attention(q, k, v, spec)
    (grad,) = torch.autograd.grad(out, qkv, do)
    ref = block_sparse_attention_ref(q, k, v, spec)
    (ref_grad,) = torch.autograd.grad(ref, qkv, do)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-5)


def test_block_table_lists_exactly_the_nonempty_blocks():
    spec = _spec("row", t=16, h=8, w=8)
    t = block_table(spec, 16, "cpu")
    layout = spec.layout(16)
    nb = layout.shape[0]
    for i in range(nb):
        cols = t.q_cols[t.q_off[i] : t.q_off[i + 1]].tolist()
        assert cols == [j for j in range(nb) if layout[i, j] != EMPTY]
        assert t.q_full[t.q_off[i] : t.q_off[i + 1]].tolist() == [int(layout[i, j] == FULL) for j in cols]
        rows = t.k_rows[t.k_off[i] : t.k_off[i + 1]].tolist()
        assert rows == [j for j in range(nb) if layout[j, i] != EMPTY]
    assert t.visited < nb * nb  # sparse: row attention skips blocks


def test_allowed_matches_the_dense_mask():
    """MaskSpec.allowed (the kernel's `_allowed` in PyTorch) equals attention_mask for every kind."""
    for kind in KINDS:
        for t, h, w in [(13, 6, 7), (0, 5, 5), (4, 3, 8)]:
            spec = MaskSpec(kind, t, h, w, kernel=5)
            pos = torch.arange(spec.n)
            assert torch.equal(spec.allowed(pos[:, None], pos[None, :]), spec.dense()), (kind, t, h, w)


@INTERPRETER
def test_bad_inputs_are_named():
    spec = _spec("row")
    q = torch.randn(1, 2, spec.n, 32)
    with pytest.raises(ValueError, match="positions"):
        block_sparse_attention(q[:, :, :-1], q[:, :, :-1], q[:, :, :-1], spec)
    with pytest.raises(ValueError, match="share"):
        block_sparse_attention(q, q.half(), q, spec)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, q, q, spec, 24)
    with pytest.raises(ValueError, match="transposed"):
        block_sparse_attention(q, q, q, MaskSpec("column", 13, 6, 7, transposed=False))


GPU = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("MEGADALLE_REQUIRE_GPU") != "1", reason="needs a CUDA device"
)
"""tools/gpu_check.sh sets MEGADALLE_REQUIRE_GPU=1: there a missing GPU fails these tests instead of skipping."""


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_full_size(kind, dtype):
    """The paper's stream, 256 text + 32x32, hd 64, 16 heads, batch 2, the GPU's default block."""
    _compare(MaskSpec(kind, 256, 32, 32), (2, 16, 1280, 64), dtype, device="cuda")


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", [32, 128])
def test_gpu_head_dims(hd, dtype):
    _compare(MaskSpec("row", 256, 32, 32), (1, 4, 1280, hd), dtype, device="cuda")
