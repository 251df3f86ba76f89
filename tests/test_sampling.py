import pytest
import torch

from megadalle.models.transformer import PAD_ID, DallePrior, PriorArgs
from megadalle.sampling import filter_logits, generate, generate_uncached

A = PriorArgs(n_layers=3, d_model=32, n_heads=4, text_len=6, text_vocab=50, grid=4, image_vocab=20, conv_kernel=3)


def inputs(B: int = 2):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, A.text_vocab, (B, A.text_len), generator=g)
    text[0, 4:] = PAD_ID
    return text, torch.randint(0, A.image_vocab, (B, A.grid**2), generator=g)


@pytest.mark.parametrize("prompt", [0, 7])
@pytest.mark.parametrize("kind", ["row", "column", "conv", "schedule"])
def test_kv_cached_logits_equal_full_forward_at_every_position(kind, prompt):
    """Text (and `prompt` image tokens: 7 overfills the row layers' ring of W + 1 = 5 slots) as one prompt, then
    one position at a time: row and conv layers decode from ring caches, column layers from a full one."""
    torch.manual_seed(0)
    model = DallePrior(A, kinds=None if kind == "schedule" else [kind] * A.n_layers).eval()
    text, image = inputs()
    with torch.no_grad():
        full = model(text, image)
        cache = model.new_cache(2)
        rings = {"row": A.text_len + 5, "conv": A.text_len + 8, "column": A.text_len + 16}
        assert [c[0].shape[2] for c in cache] == [rings[layer.attn.kind] for layer in model.layers]
        h = model.forward_cached(model.embed(text, image[:, :prompt]), cache, 0)  # the prompt
        torch.testing.assert_close(model.text_head(h[:, : A.text_len]), full.text_logits, rtol=1e-4, atol=1e-5)
        steps = [model.image_head(h[:, A.text_len - 1 :])]  # (B, prompt + 1, V)
        for p in range(prompt, A.grid**2 - 1):  # teacher-forced: feed the true token, compare the next prediction
            h = model.forward_cached(model.embed_image_token(image[:, p], p), cache, A.text_len + p)
            steps.append(model.image_head(h))
    torch.testing.assert_close(torch.cat(steps, 1), full.image_logits, rtol=1e-4, atol=1e-5)


def test_cached_and_uncached_sampling_draw_the_same_codes():
    torch.manual_seed(0)
    model = DallePrior(A).eval()
    text, _ = inputs()
    a = generate(model, text, generator=torch.Generator().manual_seed(5))
    b = generate_uncached(model, text, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 16) and int(a.max()) < A.image_vocab


def test_image_prompt_prefix_is_kept_exactly():
    torch.manual_seed(0)
    model = DallePrior(A).eval()
    text, image = inputs()
    prefix = image[:, :6]  # the first rows and a half
    out = generate(model, text, prefix, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :6], prefix)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        generate(model, text, image)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and filter_logits(logits, top_k=2)[0, 1] == 3.0
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0] + 0.01)))[0]
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist() == [True, False, False, False]


def test_generate_runs_on_the_models_device_and_checks_the_generator():
    torch.manual_seed(0)
    model = DallePrior(A).eval()
    text, image = inputs()
    out = generate(model, text, image[:, :4], temperature=0.0)
    assert out.device == model.text_head.weight.device and torch.equal(out[:, :4], image[:, :4])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="the generator is on cuda"):
            generate(model, text, generator=torch.Generator(device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [generate, generate_uncached])
def test_generate_on_cuda_equals_cpu_greedy(fn):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    model = DallePrior(A).eval()
    model.image_head.weight.data.mul_(20)  # wide logit gaps: the argmax must not hinge on float rounding
    text, image = inputs()
    cpu = fn(model, text, image[:, :5], temperature=0.0)
    model.cuda()
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    gpu = fn(model, text, image[:, :5], temperature=0.0)  # CPU inputs are moved to the model's device
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    drawn = fn(model, text, generator=torch.Generator(device="cuda").manual_seed(2))
    assert drawn.is_cuda and int(drawn.max()) < A.image_vocab
    with pytest.raises(ValueError, match=r"the generator is on cpu but the model on cuda"):
        fn(model, text, generator=torch.Generator().manual_seed(2))
