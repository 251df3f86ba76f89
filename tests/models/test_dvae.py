import math

import pytest
import torch

from megadalle.data.loader import eval_images
from megadalle.engine.schedules import cosine, warmup_then
from megadalle.models.dvae import FLAVORS, Decoder, DiscreteVAE, DVAEArgs, Encoder, count_parameters, gumbel_softmax
from megadalle.models.dvae_loss import (
    kl_to_uniform,
    logit_laplace_log_prob,
    map_pixels,
    reconstruction,
    unmap_pixels,
)
from tests.conftest import require


@pytest.mark.parametrize("mu, b", [(0.0, 1.0), (1.5, 0.3), (-2.0, 2.5), (0.4, 0.05)])
def test_logit_laplace_integrates_to_one(mu, b):
    # Independent check: integrate the density over (0, 1) in the logit domain, x = sigmoid(y),
    # dx = x (1 - x) dy, on a fine grid (trapezoid rule, float64).
    y = torch.linspace(-80, 80, 400_001, dtype=torch.float64)
    x = torch.sigmoid(y)
    ok = (x > 0) & (x < 1)
    y, x = y[ok], x[ok]
    logf = logit_laplace_log_prob(x.double(), torch.tensor(mu), torch.tensor(math.log(b)))
    total = torch.trapezoid(torch.exp(logf.double()) * x * (1 - x), y)
    assert abs(total.item() - 1) < 1e-3


def test_logit_laplace_matches_formula_pointwise():
    x, mu, b = torch.tensor(0.3), torch.tensor(0.2), torch.tensor(0.7)
    want = math.log(1 / (2 * 0.7 * 0.3 * 0.7) * math.exp(-abs(math.log(0.3 / 0.7) - 0.2) / 0.7))
    assert logit_laplace_log_prob(x, mu, b.log()).item() == pytest.approx(want, rel=1e-5)


def test_pixel_map_round_trip_and_range():
    x = torch.rand(2, 3, 5, 7)
    y = map_pixels(x)
    assert y.min() >= 0.1 - 1e-6 and y.max() <= 0.9 + 1e-6
    torch.testing.assert_close(unmap_pixels(y), x)
    assert map_pixels(torch.zeros(1)).item() == pytest.approx(0.1) and map_pixels(
        torch.ones(1)
    ).item() == pytest.approx(0.9)


def test_schedules_hit_start_and_end():
    assert cosine(0, 0.0, 6.6, 5000) == 0.0 and cosine(5000, 0.0, 6.6, 5000) == 6.6
    assert cosine(2500, 0.0, 6.6, 5000) == pytest.approx(3.3)
    assert cosine(0, 1.0, 1 / 16, 150_000) == 1.0 and cosine(10**7, 1.0, 1 / 16, 150_000) == 1 / 16
    assert cosine(0, 1e-4, 1.25e-6, 1_200_000) == 1e-4 and cosine(1_200_000, 1e-4, 1.25e-6, 1_200_000) == 1.25e-6
    values = [cosine(s, 1.0, 1 / 16, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "monotone"
    assert warmup_then(0, 5000, 4.5e-4) == pytest.approx(4.5e-4 / 5000) and warmup_then(5000, 5000, 4.5e-4) == 4.5e-4


def test_paper_flavor_sizes_on_meta_device():
    with torch.device("meta"):
        model = DiscreteVAE(FLAVORS["paper"])
    assert round(count_parameters(model.encoder) / 1e6, 1) == 53.8
    assert round(count_parameters(model.decoder) / 1e6, 1) == 43.8
    assert FLAVORS["paper"].grid_size == 32 and FLAVORS["small"].grid_size == 8 and FLAVORS["debug"].grid_size == 8


def test_shapes_and_input_errors():
    a = FLAVORS["debug"]
    m = DiscreteVAE(a)
    out = m(map_pixels(torch.rand(3, 3, 32, 32)), tau=1.0, beta=1.0)
    assert out.logits.shape == (3, a.vocab_size, 8, 8) and out.decoded.shape == (3, 6, 32, 32)
    with pytest.raises(ValueError, match="input has 4 channels but model built for 3"):
        m.encoder(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the downsampling 4"):
        m.encoder(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=f"input has 7 channels but model built for {a.vocab_size}"):
        m.decoder(torch.rand(1, 7, 8, 8))


def test_gumbel_relaxation_and_kl():
    logits = torch.randn(4, 16, 3, 5)
    z = gumbel_softmax(logits, tau=1.0)
    torch.testing.assert_close(z.sum(1), torch.ones(4, 3, 5))
    assert gumbel_softmax(logits, tau=1 / 64).max(1).values.mean() > 0.95, "near one-hot at low temperature"
    assert kl_to_uniform(torch.zeros(2, 16, 3, 5)).abs().max() < 1e-5
    peaked = torch.full((1, 16, 1, 1), -1e4)
    peaked[0, 3] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(16), rel=1e-4)


def test_loads_openai_dall_e_weights_with_identical_outputs():
    try:
        from dall_e.decoder import Decoder as OpenAIDecoder
        from dall_e.encoder import Encoder as OpenAIEncoder
    except ImportError as e:
        require(False, f"the `dall-e` package is not importable: {e}")
    args = DVAEArgs(image_size=32, group_count=4, n_hid=64, n_blk_per_group=2, vocab_size=512, n_init=32)
    torch.manual_seed(0)
    ref_enc = OpenAIEncoder(n_hid=64, n_blk_per_group=2, vocab_size=512, requires_grad=False)
    ref_dec = OpenAIDecoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=512, requires_grad=False)
    enc, dec = Encoder(args), Decoder(args)
    assert set(enc.state_dict()) == set(ref_enc.state_dict())
    assert set(dec.state_dict()) == set(ref_dec.state_dict())
    assert "blocks.group_2.block_1.res_path.conv_1.w" in enc.state_dict()
    enc.load_state_dict(ref_enc.state_dict())
    dec.load_state_dict(ref_dec.state_dict())
    x = map_pixels(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(enc(x), ref_enc(x), rtol=1e-5, atol=1e-5)
    z = torch.nn.functional.one_hot(torch.randint(0, 512, (2, 4, 4)), 512).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dec(z), ref_dec(z), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tiny_dvae_overfits_16_emoji(emoji_shards):
    images = next(eval_images(str(emoji_shards), "train", 32, 16))[0]
    assert images.shape == (16, 3, 32, 32)
    x = map_pixels(images)
    torch.manual_seed(0)
    model = DiscreteVAE(FLAVORS["debug"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    def psnr() -> float:
        with torch.no_grad():
            recon = reconstruction(model.decoder.decode_codes(model.encode_codes(x)))
            return 10 * math.log10(1 / (recon - images).square().mean().item())

    before = psnr()
    for step in range(250):
        out = model(x, tau=cosine(step, 1.0, 1 / 16, 200), beta=cosine(step, 0.0, 0.5, 100))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = psnr()
    assert after > before + 6, f"PSNR {before:.2f} -> {after:.2f} dB"


def test_loss_matches_a_hand_computation_of_the_formula():
    # SPEC: ln f(x | mu, b) = -ln(2 b x (1 - x)) - |logit(x) - mu| / b; KL(q || uniform) = sum q (ln q + ln K);
    # loss = mean over the batch of (-recon + beta * KL) / (H W C). Written out here in float64.
    torch.manual_seed(0)
    model = DiscreteVAE(FLAVORS["debug"])
    x = map_pixels(torch.rand(2, 3, 32, 32))
    dims, K = 3 * 32 * 32, FLAVORS["debug"].vocab_size
    losses = []
    for beta in (0.0, 2.5):
        torch.manual_seed(1)  # the same gumbel noise for both betas
        out = model(x, tau=0.7, beta=beta)
        xd, mu, log_b = x.double(), out.decoded[:, :3].double(), out.decoded[:, 3:].double()
        b = log_b.exp()
        log_f = -torch.log(2 * b * xd * (1 - xd)) - (torch.log(xd / (1 - xd)) - mu).abs() / b  # (B, 3, H, W)
        recon = log_f.sum(dim=(1, 2, 3))  # (B,)
        logits = out.logits.double()
        log_q = logits - logits.logsumexp(dim=1, keepdim=True)  # (B, K, h, w)
        kl = (log_q.exp() * (log_q + math.log(K))).sum(dim=(1, 2, 3))  # (B,)
        loss = ((-recon + beta * kl) / dims).mean()
        assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert out.recon.item() == pytest.approx(recon.mean().item(), rel=1e-5)
        assert out.kl.item() == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)
        assert kl.mean() > 1e-3, "the KL term is not trivially zero, so beta matters"
        losses.append(out.loss.item())
    assert losses[1] - losses[0] == pytest.approx(2.5 * kl.mean().item() / dims, rel=1e-4)


def test_bf16_model_keeps_the_fp32_likelihood_target():
    torch.manual_seed(0)
    model = DiscreteVAE(FLAVORS["debug"]).to(torch.bfloat16)
    levels = torch.arange(256, dtype=torch.float32) / 255
    images = levels[torch.randperm(2 * 3 * 32 * 32) % 256].view(2, 3, 32, 32)  # every pixel level, 24 times
    x = map_pixels(images)
    assert x.unique().numel() == 256 and x.bfloat16().unique().numel() == 231, "bf16 merges 25 pixel levels"
    torch.manual_seed(1)
    out = model(x, tau=1.0, beta=1.0)
    assert out.logits.dtype == torch.bfloat16 and out.decoded.dtype == torch.bfloat16, "the model runs in bf16"
    torch.testing.assert_close(out.logits, model.encoder(x.bfloat16()), rtol=0, atol=0)
    mu, log_b = out.decoded[:, :3], out.decoded[:, 3:]
    want = logit_laplace_log_prob(x, mu, log_b).sum(dim=(1, 2, 3)).mean()  # (the fp32 target)
    rounded = logit_laplace_log_prob(x.bfloat16().float(), mu, log_b).sum(dim=(1, 2, 3)).mean()
    assert out.recon.dtype == torch.float32
    torch.testing.assert_close(out.recon, want, rtol=1e-6, atol=1e-4)
    gap = (rounded - want).abs().item()
    assert gap > 1e-2 and gap > 100 * (out.recon - want).abs().item(), f"a bf16 target would shift recon by {gap}"


def test_warm_start_objective_decodes_the_given_codes_and_uses_their_cross_entropy():
    """With target_codes the decoder sees those codes one-hot and the loss is (-recon + CE(q, codes)) / dims."""
    torch.manual_seed(0)
    model = DiscreteVAE(FLAVORS["debug"])
    x = map_pixels(torch.rand(2, 3, 32, 32))
    codes = torch.randint(0, FLAVORS["debug"].vocab_size, (2, 8, 8))
    out = model(x, tau=0.5, beta=6.6, target_codes=codes)
    assert torch.equal(out.decoded, model.decoder.decode_codes(codes))
    recon = logit_laplace_log_prob(x, out.decoded[:, :3], out.decoded[:, 3:]).double().sum(dim=(1, 2, 3))  # (B,)
    log_q = out.logits.double().log_softmax(dim=1)  # (B, K, h, w)
    ce = -log_q.gather(1, codes[:, None]).sum(dim=(1, 2, 3))  # (B,)
    assert out.loss.item() == pytest.approx(((-recon + ce) / (3 * 32 * 32)).mean().item(), rel=1e-5)
    assert out.kl.item() == pytest.approx(kl_to_uniform(out.logits).mean().item())  # still reported


def test_subpixel_upsampling_decoder():
    """The demo's decoder: a 1x1 conv to 4x the next width and a pixel shuffle; the paper's stays nearest."""
    assert FLAVORS["paper"].upsample == "nearest" and FLAVORS["small"].upsample == "subpixel"
    args = DVAEArgs(image_size=32, group_count=3, n_hid=16, n_blk_per_group=1, vocab_size=32, n_init=16,
                    upsample="subpixel")  # fmt: skip
    dec = Decoder(args)
    up = dec.blocks.group_1.upsample
    assert up.conv.w.shape == (4 * 32, 64, 1, 1)  # group 1 is 64 wide, group 2 is 32
    assert isinstance(dec.blocks.group_2.block_1.id_path, torch.nn.Identity)  # the shuffle gives group 2's width
    h = torch.randn(1, 64, 8, 8)
    y = up(h)  # (1, 32, 16, 16)
    w = up.conv.w[:, :, 0, 0].view(32, 4, 64)  # (out, 2x2 sub-pixel, in): pixel_shuffle's channel order
    want = torch.einsum("osi,i->os", w, h[0, :, 3, 5]) + up.conv.b.view(32, 4)  # cell (3, 5)
    assert torch.allclose(y[0, :, 6:8, 10:12].reshape(32, 4), want, atol=1e-5)
    assert dec(torch.randn(2, 32, 8, 8)).shape == (2, 6, 32, 32)
    with pytest.raises(ValueError, match="upsample must be one of"):
        DVAEArgs(upsample="bilinear")
