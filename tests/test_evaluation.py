import pytest
import torch

from megadalle.data.loader import eval_images
from megadalle.evaluation import blur, fid, fid_from_features, inception_features, inception_score
from tests.conftest import require

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(emoji_shards) -> torch.Tensor:
    try:
        from megadalle.evaluation import inception

        inception()
    except FileNotFoundError as e:
        require(False, str(e))
    return next(eval_images(str(emoji_shards), "train", 32, 24))[0]


def test_fid_of_a_set_with_itself_is_zero_and_rises_with_noise(real):
    feats = inception_features(real)
    assert abs(fid_from_features(feats, feats)) < 1e-3  # ~0: FIDs here are 10 to 300
    g = torch.Generator().manual_seed(0)
    values = []
    for sigma in (0.05, 0.2, 0.5):
        noisy = (real + sigma * torch.randn(real.shape, generator=g)).clamp(0, 1)
        values.append(fid_from_features(feats, inception_features(noisy)))
    assert 0 < values[0] < values[1] < values[2], values


def test_blur_is_applied_to_both_sides(real):
    assert abs(fid(real, real, blur_radius=4)) < 1e-3  # one-sided blur would make this large
    assert fid(real, blur(real, 4)) > 1.0
    assert torch.equal(blur(real, 0), real)
    assert blur(real, 2).shape == real.shape


def test_inception_score_prefers_varied_images(real):
    varied = inception_score(real)
    same = inception_score(real[:1].expand(len(real), -1, -1, -1))
    assert same == pytest.approx(1.0, abs=1e-6) and varied > 1.5, (varied, same)


def test_inception_features_cached_by_content(real, tmp_path):
    import numpy as np

    first = inception_features(real[:6], cache=tmp_path)
    [kept] = list(tmp_path.glob("inception_*.npy"))
    assert np.array_equal(np.load(kept), first) and np.array_equal(first, inception_features(real[:6]))
    np.save(kept, np.zeros_like(first))  # a planted entry: a second call with the same images reads it
    assert not inception_features(real[:6].clone(), cache=tmp_path).any(), "a copy of the images is the same key"
    other = real[:6].clone()
    other[0, 0, 0, 0] += 1 / 255  # one value changed: another key, computed anew
    assert inception_features(other, cache=tmp_path).any() and len(list(tmp_path.glob("inception_*.npy"))) == 2
    kept.write_bytes(b"damaged")  # a cut entry is computed anew, not trusted
    assert np.array_equal(inception_features(real[:6], cache=tmp_path), first)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("inception_")) == [], "no temp files"
