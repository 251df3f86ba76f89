import math

import pytest
import torch
import torch.nn.functional as F

from megadalle.engine.wrap import apply_activation_checkpointing
from megadalle.models.transformer import (
    FLAVORS,
    PAD_ID,
    DallePrior,
    PriorArgs,
    check_token_ranges,
    count_parameters,
)

A = PriorArgs(n_layers=3, d_model=32, n_heads=4, text_len=6, text_vocab=50, grid=4, image_vocab=20, conv_kernel=3)


def batch(B: int = 2, seed: int = 0, text_lengths: tuple[int, ...] = (4, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, A.text_vocab, (B, A.text_len), generator=g)
    for i, n in enumerate(text_lengths[:B]):
        text[i, n:] = PAD_ID
    image = torch.randint(0, A.image_vocab, (B, A.grid**2), generator=g)
    return text, image


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_causal_for_each_layer_kind(kind):
    torch.manual_seed(0)
    model = DallePrior(A, kinds=[kind] * A.n_layers).eval()
    text, image = batch(1, text_lengths=(6,))
    base = model(text, image)
    N = A.text_len + A.grid**2
    for s in range(1, N):  # change the token at stream position s
        t2, i2 = text.clone(), image.clone()
        if s < A.text_len:
            t2[0, s] = 4 + (t2[0, s] - 4 + 1) % (A.text_vocab - 4)
        else:
            i2[0, s - A.text_len] = (i2[0, s - A.text_len] + 1) % A.image_vocab
        out = model(t2, i2)
        # every prediction made at a position < s is unchanged
        text_same = out.text_logits[0, : min(s, A.text_len)]
        torch.testing.assert_close(text_same, base.text_logits[0, : min(s, A.text_len)], rtol=0, atol=1e-5)
        img_pos = max(0, s - A.text_len + 1)  # image logits j come from stream position T - 1 + j
        torch.testing.assert_close(out.image_logits[0, :img_pos], base.image_logits[0, :img_pos], rtol=0, atol=1e-5)
        # the prediction made at s itself does change: every mask lets a position see itself
        if s < A.text_len:
            assert not torch.allclose(out.text_logits[0, s], base.text_logits[0, s])
        elif s < N - 1:
            assert not torch.allclose(out.image_logits[0, img_pos], base.image_logits[0, img_pos])


def test_padding_tokens_only_where_there_is_no_text():
    model = DallePrior(A)
    text, _ = batch()
    ids = model.text_ids(text)
    assert torch.equal(ids[0, :4], text[0, :4]) and torch.equal(ids[1], text[1])
    assert ids[0, 4:].tolist() == [A.text_vocab + 4, A.text_vocab + 5]  # its own learned token per position
    assert model.text_emb.num_embeddings == A.text_vocab + A.text_len


def test_loss_weights_and_normalisation_by_hand():
    torch.manual_seed(0)
    model = DallePrior(A)
    text, image = batch()
    out = model(text, image)
    lp_t = F.log_softmax(out.text_logits, -1)
    lp_i = F.log_softmax(out.image_logits, -1)
    text_nll, n_text = 0.0, 0
    for b in range(2):
        for t in range(A.text_len - 1):  # logits at t predict the token at t + 1, if it is real text
            if text[b, t + 1] != PAD_ID:
                text_nll -= lp_t[b, t, text[b, t + 1]].item()
                n_text += 1
    image_nll = -sum(lp_i[b, j, image[b, j]].item() for b in range(2) for j in range(A.grid**2))
    assert n_text == 3 + 5
    want_text, want_image = text_nll / n_text, image_nll / (2 * A.grid**2)
    assert out.text_loss.item() == pytest.approx(want_text, rel=1e-5)
    assert out.image_loss.item() == pytest.approx(want_image, rel=1e-5)
    assert out.loss.item() == pytest.approx(want_text / 8 + 7 * want_image / 8, rel=1e-5)
    assert out.text_logits.dtype == torch.float32 and out.image_logits.dtype == torch.float32


def test_logits_fp32_under_bf16_and_checkpointing_matches():
    torch.manual_seed(0)
    model = DallePrior(A)
    text, image = batch()
    ref = model(text, image)
    ref.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    out = model(text, image)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    model.to(torch.bfloat16)
    assert model(text, image).image_logits.dtype == torch.float32


def test_input_errors():
    model = DallePrior(A)
    text, image = batch()
    with pytest.raises(ValueError, match=r"text has shape \(2, 5\) but the model takes \(B, 6\)"):
        model(text[:, :5], image)
    with pytest.raises(ValueError, match=r"image codes must be in \[0, 20\)"):
        check_token_ranges(A, text, image + 100)
    with pytest.raises(ValueError, match=r"text ids must be in \[0, 50\)"):
        check_token_ranges(A, text + 100, image)
    check_token_ranges(A, text, image)  # in range: no error


def test_sums_and_counts_give_the_means():
    torch.manual_seed(0)
    out = DallePrior(A)(*batch())
    assert int(out.text_count) == 3 + 5 and int(out.image_count) == 2 * A.grid**2
    torch.testing.assert_close(out.text_loss, out.text_nll / out.text_count)
    torch.testing.assert_close(out.image_loss, out.image_nll / out.image_count)
    with torch.no_grad():
        empty = DallePrior(A)(*batch(text_lengths=(1, 1)))  # no caption has a second token: no text target
    assert float(empty.text_nll) == 0.0 and int(empty.text_count) == 0 and float(empty.text_loss) == 0.0


def test_initialisation_is_each_modules_own():
    """Every parameter gets the model's initialisation (not PyTorch's defaults), also when a module is rebuilt
    on its own: zero.Init partitions each submodule when its constructor returns."""
    torch.manual_seed(0)
    a = PriorArgs(n_layers=4, d_model=256, n_heads=4, text_len=6, text_vocab=500, grid=4, image_vocab=300)
    model = DallePrior(a)
    for name, p in model.named_parameters():
        if name.endswith(("ln.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif name.endswith("proj.weight"):  # residual projections: 0.02 / sqrt(2 n_layers)
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * a.n_layers), rel=0.1), name
        else:  # qkv, fc, embeddings, heads
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


def test_every_mask_moves_with_the_module():
    model = DallePrior(A, kinds=["row", "column", "conv"])
    masks = {n: b for n, b in model.named_buffers()}
    assert {n.rsplit(".", 1)[-1] for n in masks} == {"mask", "perm", "inv_perm"}
    assert sum(n.endswith(".mask") for n in masks) == 3
    model.to("meta")
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_flex_block_mask_is_owned_and_moves(kind):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = DallePrior(A, "flex", kinds=[kind] * A.n_layers)
    plans = [layer.attn.attend for layer in model.layers]
    assert len({id(p.block_mask) for p in plans}) == A.n_layers  # one BlockMask per layer, not a shared cache
    assert all(p.block_mask.kv_num_blocks.device.type == "cpu" for p in plans)
    model.to("meta")  # the BlockMask follows its mask: none on the meta device (a stale one would be wrong)
    assert all(p.mask.device.type == "meta" and p.block_mask is None for p in plans)


@pytest.mark.gpu
def test_masks_and_block_masks_move_to_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = DallePrior(A, "flex", kinds=["row", "column", "conv"]).cuda()
    assert all(b.device.type == "cuda" for b in model.buffers())
    assert all(layer.attn.attend.block_mask.kv_num_blocks.device.type == "cuda" for layer in model.layers)


def test_flavor_sizes_on_meta_device():
    with torch.device("meta"):
        n12 = count_parameters(DallePrior(FLAVORS["12b"]))
        n13 = count_parameters(DallePrior(FLAVORS["1p3b"]))
    a = FLAVORS["12b"]
    assert (a.n_layers, a.d_model, a.n_heads, a.head_dim, a.seq_len) == (64, 3968, 62, 64, 1280)
    # 64 x 12 d^2 = 12.09B in the resblocks, plus embeddings and heads: ~12.3B, "about 12B" in the paper
    assert 12.0e9 < n12 < 12.5e9, n12
    assert 1.2e9 < n13 < 1.4e9, n13


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_dense_and_flex_agree(kind):
    """20 constructions in a row (models freed and rebuilt, so memory is reused): each flex layer must use its
    own mask. A cache keyed on mask addresses handed stale BlockMasks here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    text, image = batch()
    for i in range(20):
        torch.manual_seed(i)
        kinds = [kind] * A.n_layers if i % 2 == 0 else ["row", "column", "conv"]
        dense = DallePrior(A, "dense", kinds=kinds).eval()
        flex = DallePrior(A, "flex", kinds=kinds).eval()
        flex.load_state_dict(dense.state_dict())
        with torch.no_grad():  # FlexAttention has no backward on CPU; the gradient check is marked gpu
            a, b = dense(text, image), flex(text, image)
        torch.testing.assert_close(b.image_logits, a.image_logits, rtol=1e-4, atol=1e-4)
        assert math.isclose(a.loss.item(), b.loss.item(), rel_tol=1e-5)
        del dense, flex


@pytest.mark.gpu
def test_dense_and_flex_gradients_agree_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (FlexAttention's backward does not run on CPU)")
    torch.manual_seed(0)
    dense = DallePrior(A, "dense").cuda()
    flex = DallePrior(A, "flex").cuda()
    flex.load_state_dict(dense.state_dict())
    text, image = (t.cuda() for t in batch())
    dense(text, image).loss.backward()
    flex(text, image).loss.backward()
    for p, q in zip(dense.parameters(), flex.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4)
