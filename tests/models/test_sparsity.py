import pytest
import torch

from megadalle.models.sparsity import (
    EMPTY,
    FULL,
    PARTIAL,
    attention_mask,
    block_layout,
    density,
    image_transpose_perm,
    layer_kinds,
)

# Independent brute-force definitions, position by position, in raster order.


def brute(kind: str, T: int, H: int, W: int, kernel: int = 11) -> torch.Tensor:
    N = T + H * W
    m = torch.zeros(N, N, dtype=torch.bool)
    for q in range(N):
        for k in range(N):
            if q < T:
                m[q, k] = k < T and k <= q
                continue
            if k < T:
                m[q, k] = True
                continue
            p, pk = q - T, k - T
            (r, c), (rk, ck) = divmod(p, W), divmod(pk, W)
            if kind == "row":
                m[q, k] = p - W <= pk <= p
            elif kind == "column":
                m[q, k] = ck == c and rk <= r
            else:  # conv: rows clipped, columns wrapped modulo W, raster causal
                half = kernel // 2
                col_ok = any((c + d) % W == ck for d in range(-half, half + 1))
                m[q, k] = pk <= p and abs(rk - r) <= half and col_ok
    return m


def transpose_image(m: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
    order = torch.cat([torch.arange(T), T + image_transpose_perm(H, W)])
    return m[order][:, order]


@pytest.mark.parametrize("T, H, W", [(6, 4, 4), (3, 5, 7), (0, 3, 3), (5, 6, 2)])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_masks_equal_brute_force(kind, T, H, W):
    kernel = 3 if kind == "conv" else 11
    want = brute(kind, T, H, W, kernel)
    assert torch.equal(attention_mask(kind, T, H, W, kernel, transposed=False), want)
    if kind == "column":  # what the model uses: the image part transposed, causal in groups of H
        got = attention_mask(kind, T, H, W, kernel)
        assert torch.equal(got, transpose_image(want, T, H, W))
        img = got[T:, T:]
        groups = torch.block_diag(*[torch.ones(H, H, dtype=torch.bool).tril() for _ in range(W)])
        assert torch.equal(img, groups)


def test_paper_figure_11_example_row_extent_5():
    m = attention_mask("row", 6, 4, 4)
    img = m[6:, 6:]
    assert img.sum(1).tolist() == [1, 2, 3, 4, 5] + [5] * 11  # previous width + 1 = 5, itself included
    assert m[6:, :6].all() and not m[:6, 6:].any()  # image sees all text; text never sees the image
    assert torch.equal(m[:6, :6], torch.ones(6, 6, dtype=torch.bool).tril())


def test_conv_kernel_11_on_a_wide_grid_and_wraparound():
    m = attention_mask("conv", 0, 12, 16, kernel=11)
    q = 7 * 16 + 8  # row 7, col 8: 5 full rows above (11 each) + 6 on its own row
    assert int(m[q].sum()) == 5 * 11 + 6
    edge = 7 * 16 + 0  # column 0: the window wraps to columns 11..15 of rows above
    assert m[edge, 6 * 16 + 15] and m[edge, 6 * 16 + 11] and not m[edge, 6 * 16 + 10]
    assert not m[edge, 7 * 16 + 15]  # same row, later in raster order: not causal


def test_densities_at_paper_size():
    # attended pairs / causal pairs at 256 text + 32x32 image: row ~0.40, column ~0.38, conv ~0.43 (SPEC)
    got = {k: density(attention_mask(k, 256, 32, 32)) for k in ("row", "column", "conv")}
    assert got["row"] == pytest.approx(0.40, abs=0.005)
    assert got["column"] == pytest.approx(0.38, abs=0.005)
    assert got["conv"] == pytest.approx(0.43, abs=0.01)
    causal = torch.ones(1280, 1280, dtype=torch.bool).tril()
    col_raster = attention_mask("column", 256, 32, 32, transposed=False)
    full_raster = (block_layout(col_raster, 32) == EMPTY).sum()
    full_transposed = (block_layout(attention_mask("column", 256, 32, 32), 32) == EMPTY).sum()
    assert full_raster == (block_layout(causal, 32) == EMPTY).sum() < full_transposed  # transposed is sparser


@pytest.mark.parametrize("block", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_block_layout_covers_exactly_the_mask(kind, block):
    mask = attention_mask(kind, 6, 4, 5, kernel=3)
    layout = block_layout(mask, block)
    n = mask.shape[0]
    assert layout.shape == (-(-n // block),) * 2
    for i in range(layout.shape[0]):
        for j in range(layout.shape[1]):
            tile = mask[i * block : (i + 1) * block, j * block : (j + 1) * block]
            want = EMPTY if not tile.any() else FULL if tile.all() else PARTIAL
            assert layout[i, j] == want, (i, j)


def test_layer_schedule():
    kinds = layer_kinds(64)
    assert kinds[:6] == ["row", "column", "row", "row", "row", "column"]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert all((kinds[i - 1] == "column") == ((i - 2) % 4 == 0) for i in range(1, 64))
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        layer_kinds(0)
