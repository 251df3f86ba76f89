"""The block-sparse implementations behind `model.attention` against dense masked SDPA: the PyTorch `blocked`
path, the Triton kernels inside the transformer (interpreter on the CPU), `auto`'s choice, and the decode path
that reads only the keys a query may see."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megadalle.models.attention import (
    AutoAttention,
    BlockedAttention,
    DenseAttention,
    decode_attention,
    decode_window,
    make_attention,
)
from megadalle.models.blocked_attention import BlockedPlan, blocked_attention
from megadalle.models.sparsity import MaskSpec
from megadalle.models.transformer import FLAVORS, DallePrior, PriorArgs


@pytest.mark.parametrize("kind", ["row", "column", "conv", "causal"])
@pytest.mark.parametrize("t, h, w, block", [(13, 6, 7, 16), (0, 5, 5, 16), (16, 8, 8, 32), (3, 9, 4, 64)])
def test_blocked_equals_dense_forward_and_backward(kind, t, h, w, block):
    spec = MaskSpec(kind, t, h, w, kernel=3 if kind == "conv" else 11)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, spec.n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 3, spec.n, 8, generator=g, dtype=torch.float64)
    out = blocked_attention(q, k, v, BlockedPlan(spec, block))
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense())
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g_, r in zip(grads, ref_grads):
        torch.testing.assert_close(g_, r, rtol=0, atol=1e-12)


def test_blocked_band_is_narrow_for_the_paper_layouts():
    """At 256 + 32x32 with blocks of 32 a query block reads 2 (row), 1 (column) and 6 (conv) image key blocks."""
    slots = {k: BlockedPlan(MaskSpec(k, 256, 32, 32), 32).slots for k in ("row", "column", "conv")}
    assert slots == {"row": 2, "column": 1, "conv": 6}


@pytest.mark.parametrize("attention", ["blocked", "triton", "auto"])
def test_transformer_matches_dense_on_loss_and_gradients(attention):
    if attention == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter; on a GPU the gpu test covers triton")
    """The debug flavor (every layer kind, column layers transposed): same loss and gradients as `dense`."""
    a = FLAVORS["debug"]
    g = torch.Generator().manual_seed(3)
    text = torch.randint(4, a.text_vocab, (2, a.text_len), generator=g)
    image = torch.randint(0, a.image_vocab, (2, a.grid * a.grid), generator=g)
    results = {}
    for name in ("dense", attention):
        torch.manual_seed(0)
        model = DallePrior(a, name)
        out = model(text, image)
        out.loss.backward()
        results[name] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_d, grads_d), (loss, grads) = results["dense"], results[attention]
    torch.testing.assert_close(loss, loss_d, rtol=1e-5, atol=0)
    for n, gd in grads_d.items():
        torch.testing.assert_close(grads[n], gd, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("MEGADALLE_REQUIRE_GPU") != "1", reason="needs a CUDA device"
)
def test_gpu_transformer_triton_matches_dense_at_the_paper_stream():
    """256 text + 32x32 image, 4 layers of 256 (every kind), fp32: `triton` (and `auto`, which picks it on a GPU)
    gives dense's loss and gradients."""
    a = PriorArgs(n_layers=4, d_model=256, n_heads=4, text_len=256, text_vocab=1000, grid=32, image_vocab=512)
    g = torch.Generator().manual_seed(3)
    text = torch.randint(4, a.text_vocab, (2, a.text_len), generator=g).cuda()
    image = torch.randint(0, a.image_vocab, (2, a.grid * a.grid), generator=g).cuda()
    results = {}
    for name in ("dense", "triton", "auto"):
        torch.manual_seed(0)
        model = DallePrior(a, name).cuda()
        out = model(text, image)
        out.loss.backward()
        results[name] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    loss_d, grads_d = results["dense"]
    for name in ("triton", "auto"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, loss_d, rtol=1e-5, atol=0)
        for n, gd in grads_d.items():
            torch.testing.assert_close(grads[n], gd, rtol=1e-3, atol=1e-5, msg=f"{name} {n}")


def test_auto_picks_the_measured_faster_path_on_cpu():
    assert isinstance(AutoAttention(MaskSpec("row", 256, 32, 32)).on_cpu, BlockedAttention)
    assert isinstance(AutoAttention(MaskSpec("column", 256, 32, 32)).on_cpu, BlockedAttention)
    assert isinstance(AutoAttention(MaskSpec("column", 64, 16, 16)).on_cpu, BlockedAttention)
    assert isinstance(AutoAttention(MaskSpec("conv", 64, 16, 16)).on_cpu, DenseAttention)
    assert isinstance(AutoAttention(MaskSpec("row", 32, 8, 8)).on_cpu, DenseAttention)  # the demo's 96 positions


def test_unknown_attention_is_named():
    with pytest.raises(ValueError, match="'nope' is not implemented"):
        make_attention("nope", MaskSpec("row", 4, 2, 2))


@pytest.mark.parametrize("kind", ["row", "column", "conv", "causal"])
@pytest.mark.parametrize("t", [5, 0])
def test_decode_reads_only_its_window_and_equals_dense(kind, t):
    """fp32 against dense SDPA, and a bf16 cache stays bf16 (conv's bias is fp32)."""
    spec = MaskSpec(kind, t, 4, 6, kernel=3, transposed=False)
    win = decode_window(spec, "cpu")
    dense = spec.dense()
    # the widest image window: row W + 1, column H, conv two whole rows (the bias masks the far columns)
    widest = {"row": 7, "column": 4, "conv": 12, "causal": 24}[kind]
    assert max(win.width) == widest and (win.bias is None) == (kind != "conv")
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, spec.n, 8, generator=g), torch.randn(2, 3, spec.n, 8, generator=g)
    for i in range(24):
        pos = t + i
        window = set(range(t + win.lo[i], pos + 1, win.step))
        assert {k for k in dense[pos].nonzero().flatten().tolist() if k >= t} <= window
        q = torch.randn(2, 3, 1, 8, generator=g)
        want = F.scaled_dot_product_attention(q, keys, values, attn_mask=dense[pos : pos + 1])
        torch.testing.assert_close(decode_attention(q, keys, values, pos, spec, win), want)
        low = decode_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), pos, spec, win)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), want, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="image position"):
        decode_attention(q, keys, values, t - 1, spec, win)


def test_decode_rejects_the_transposed_column_mask():
    with pytest.raises(ValueError, match="raster order"):
        decode_window(MaskSpec("column", 4, 3, 3), "cpu")
