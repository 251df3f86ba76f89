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
