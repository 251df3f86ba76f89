import random

import numpy as np
import pytest

from megadalle.data.transforms import center_resize, dvae_augment, near_center_offset, prior_augment


def test_listing1_output_size_and_content():
    rng = random.Random(0)
    img = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    sizes = set()
    for _ in range(20):
        out = dvae_augment(img, 128, rng)
        assert out.shape == (128, 128, 3) and out.dtype == np.uint8
        sizes.add(out.tobytes())
    assert len(sizes) > 1, "random crops differ"


def test_listing1_identity_or_mirror_when_image_is_the_target_size():
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for seed in range(8):
        out = dvae_augment(img, 64, random.Random(seed))
        assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])


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


# Structured images: pixel (r, c) holds (r, c, 0), so every output pixel says where in the source it came from.


def coords(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: red = row, green = column, blue = noise (so that exact comparisons see content)."""
    assert h <= 256 and w <= 256, "coordinates must fit in uint8"
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
    noise = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w))
    return np.stack([r, c, noise], axis=-1).astype(np.uint8)  # (h, w, 3)


TOL = 1.0


def source_window(out: np.ndarray) -> tuple[float, float, float, float, bool]:
    """From an augmented coordinate image: (row start, col start, source pixels per output pixel along rows,
    along cols, mirrored). An area resize of a linear ramp is the ramp sampled at the output pixel centres,
    out[i] ~ start + (i + 1/2) * step - 1/2, so a line fit gives step and start (within TOL pixels: PIL's BOX
    averages whole source pixels and rounds, which leaves residuals of up to half a pixel)."""
    rows, cols = out[..., 0].astype(np.int64), out[..., 1].astype(np.int64)
    assert (rows == rows[:, :1]).all() and (cols == cols[:1]).all(), "rows and columns stay separable"
    r, c = rows[:, 0].astype(float), cols[0].astype(float)
    mirrored = c[-1] < c[0]
    if mirrored:
        c = c[::-1]
    i = np.arange(len(r))
    step_r, a_r = np.polyfit(i, r, 1)
    step_c, a_c = np.polyfit(i, c, 1)
    return a_r + 0.5 - step_r / 2, a_c + 0.5 - step_c / 2, step_r, step_c, mirrored


@pytest.mark.parametrize("augment", [dvae_augment, prior_augment])
def test_square_crop_of_the_short_side_exactly(augment):
    # target = short side: no resize and a full final crop, so the output IS the square crop (maybe mirrored)
    img = coords(96, 200)
    offsets, flips = [], 0
    for seed in range(200):
        out = augment(img, 96, random.Random(seed))
        flipped = out[0, 0, 1] > out[0, -1, 1]
        if flipped:
            out = out[:, ::-1]
            flips += 1
        off = int(out[0, 0, 1])
        assert np.array_equal(out, img[:, off : off + 96]), "a 96x96 square at a valid position, else a mirror"
        offsets.append(off)
    if augment is dvae_augment:
        assert 0 <= min(offsets) <= 20 and 84 <= max(offsets) <= 104, "Listing 1 crops anywhere"
        assert 70 <= flips <= 130, f"flipped {flips} of 200"
    else:
        assert flips == 0, "Listing 2 never flips"
        assert min(offsets) >= 3 / 8 * 104 and max(offsets) <= 5 / 8 * 104, (min(offsets), max(offsets))
        assert len(set(offsets)) > 10, "the offset is random, not always the centre"


def test_draws_come_only_from_the_given_rng():
    img = np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for augment in (dvae_augment, prior_augment):
        outs = [augment(img, 48, random.Random(seed)) for seed in (7, 7, 8)]
        assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("shape", [(220, 150), (150, 220), (80, 100), (120, 120)])
def test_listing1_resize_side_and_crop_position(shape):
    h, w = shape
    target, s = 64, min(shape)
    t_lo, t_hi = min(s, round(9 / 8 * target)), min(s, round(12 / 8 * target))
    sides, flips = [], 0
    for seed in range(60):
        out = dvae_augment(coords(h, w), target, random.Random(seed))
        r0, c0, step_r, step_c, mirrored = source_window(out)
        assert step_r == pytest.approx(step_c, abs=0.02), "a square crop: the same scale on both axes"
        t = s / step_r
        assert t_lo - 0.5 <= t <= t_hi + 0.5, f"resize side {t:.2f} outside [{t_lo}, {t_hi}]"
        assert -TOL <= r0 and r0 + target * step_r <= h + TOL and -TOL <= c0 and c0 + target * step_c <= w + TOL
        sides.append(round(t))
        flips += mirrored
    assert min(sides) <= t_lo + 2 and max(sides) >= t_hi - 2, f"sides {sorted(set(sides))} cover [{t_lo}, {t_hi}]"
    assert 15 <= flips <= 45, f"flipped {flips} of 60"


@pytest.mark.parametrize("shape", [(150, 250), (250, 150), (70, 64), (120, 120)])
def test_listing2_near_centre_crop_resize_side_and_no_flip(shape):
    h, w = shape
    target, s = 64, min(shape)
    t_hi = min(s, round(9 / 8 * target))
    sides = []
    for seed in range(60):
        out = prior_augment(coords(h, w), target, random.Random(seed))
        r0, c0, step_r, step_c, mirrored = source_window(out)
        assert not mirrored
        assert step_r == pytest.approx(step_c, abs=0.02), "a square crop: the same scale on both axes"
        t = s / step_r
        assert target - 0.5 <= t <= t_hi + 0.5, f"resize side {t:.2f} outside [{target}, {t_hi}]"
        # the source window lies in the square, whose offset along the long side is in [3/8, 5/8] of the slack
        for start, n in ((r0, h), (c0, w)):
            slack = n - s
            assert 3 / 8 * slack - TOL <= start and start + target * step_r <= 5 / 8 * slack + s + TOL
        sides.append(round(t))
    if t_hi > target:
        assert min(sides) <= target + 1 and max(sides) >= t_hi - 1, f"sides {sorted(set(sides))}"
    if s == h == w:  # a square input: the crop is the whole image, the window only moves by the final crop
        assert all(t >= target for t in sides)


def test_listing2_on_a_square_target_size_image_is_the_identity():
    img = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for seed in range(10):
        assert np.array_equal(prior_augment(img, 40, random.Random(seed)), img)


@pytest.mark.parametrize("slack", range(0, 60))
def test_near_centre_offset_range(slack):
    offsets = {near_center_offset(slack, random.Random(seed)) for seed in range(80)}
    if slack in (1, 3):  # no integer in [3/8, 5/8] x slack
        assert offsets == {slack // 2}
    else:
        assert all(3 / 8 * slack <= o <= 5 / 8 * slack for o in offsets), (slack, sorted(offsets))
        lo, hi = -(-3 * slack // 8), 5 * slack // 8
        assert offsets == set(range(lo, hi + 1)), "every admissible offset is drawn"


def test_listing2_too_small_image_is_an_error():
    with pytest.raises(ValueError, match="image of 40x30 is smaller than the target 32"):
        prior_augment(np.zeros((30, 40, 3), np.uint8), 32, random.Random(0))
