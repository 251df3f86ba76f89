import pytest
import torch

from megadalle.data.loader import eval_images
from megadalle.models.clip import FLAVORS, ContrastiveModel, recall_at_k
from megadalle.models.tokenizer import BPETokenizer


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.5, 0.4]])
    assert recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, 2) == pytest.approx(1.0)


@pytest.mark.slow
def test_contrastive_model_trains_and_retrieves_above_chance(emoji_shards, tokenizer_model):
    images, captions, _ = next(eval_images(str(emoji_shards), "train", 32, 32))
    tok = BPETokenizer(tokenizer_model, max_len=16, dropout=0.0).eval()
    text = tok.encode_batch(captions)[0]
    torch.manual_seed(0)
    model = ContrastiveModel(FLAVORS["debug"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(120):
        out = model(images, text)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    with torch.no_grad():
        sim = model.embed_images(images) @ model.embed_text(text).T  # (32, 32)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, "InfoNCE falls"
    chance = 1 / 32
    assert recall_at_k(sim, 1) > 5 * chance and recall_at_k(sim.T, 1) > 5 * chance
    scores = model.score(images[:4], text[:4])
    assert scores.shape == (4,) and torch.allclose(scores, 100 * sim.diagonal()[:4], atol=1e-3)
