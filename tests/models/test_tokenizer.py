import pytest

from megadalle.models.tokenizer import PAD_ID, BPETokenizer, train_bpe
from tests.conftest import REPO  # noqa: F401

CAPTION = "Woman Mechanic, medium-light skin tone in openmoji style"


@pytest.fixture
def tok(tokenizer_model):
    return BPETokenizer(tokenizer_model, max_len=256, dropout=0.1)


def test_round_trip_lowercases(tok, emoji_shards):
    from train_tokenizer import captions

    texts = captions(str(emoji_shards))
    assert len(texts) > 100
    for t in texts:
        assert tok.decode(tok.encode(t)) == t.lower()
    assert tok.decode(tok.encode(CAPTION)) == CAPTION.lower()
    assert tok.encode(CAPTION) == tok.encode(CAPTION.lower())


def test_dropout_varies_in_training_only(tok):
    tok.eval()
    assert len({tuple(tok.encode(CAPTION)) for _ in range(30)}) == 1
    tok.train()
    segs = [tok.encode(CAPTION) for _ in range(60)]
    assert len({tuple(s) for s in segs}) > 1, "BPE-dropout should change the segmentation"
    assert all(tok.decode(s) == CAPTION.lower() for s in segs)
    mean_len = sum(map(len, segs)) / len(segs)
    tok.eval()
    assert mean_len > len(tok.encode(CAPTION)), "dropped merges give more, shorter pieces"


def test_truncation_at_max_len_counted(tok):
    long = " ".join(["red heart"] * 300)
    ids = tok.eval().encode(long)
    assert len(ids) == 256
    assert tok.stats.truncated == 1 and tok.stats.dropped_tokens > 0
    batch, lengths = tok.encode_batch([long, "red heart"])
    assert batch.shape == (2, 256) and lengths.tolist()[0] == 256
    assert (batch[1, lengths[1] :] == PAD_ID).all()
    assert tok.stats.truncated == 2


def test_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="empty caption"):
        tok.encode("   ")
    with pytest.raises(FileNotFoundError, match="tools/train_tokenizer.py"):
        BPETokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="Lower tokenizer.vocab_size"):
        train_bpe(["a b c"] * 10, tmp_path / "tiny", vocab_size=5000)
