import random

import numpy as np
import pytest

from megadalle.data.transforms import center_resize, dvae_augment


def test_listing1_output_size_and_content():
    rng = random.Random(0)
    img = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    sizes = set()
    for _ in range(20):
        out = dvae_augment(img, 128, rng)
        assert out.shape == (128, 128, 3) and out.dtype == np.uint8
        sizes.add(out.tobytes())
    assert len(sizes) > 1, "random crops differ"


def test_listing1_identity_when_image_is_the_target_size():
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(dvae_augment(img, 64, random.Random(0)), img)


def test_listing1_resize_range_is_bounded_by_the_short_side():
    # a constant image stays constant through crop and area resize, whatever the random draws
    img = np.full((100, 90, 3), 77, dtype=np.uint8)
    out = dvae_augment(img, 64, random.Random(3))
    assert out.shape == (64, 64, 3) and (out == 77).all()


def test_too_small_image_is_an_error_and_center_resize():
    with pytest.raises(ValueError, match="smaller than the target 64"):
        dvae_augment(np.zeros((32, 40, 3), np.uint8), 64, random.Random(0))
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 10:50] = 255  # the central square is white
    assert (center_resize(img, 20) == 255).all()
