"""megadalle.models.layers under fp16 autocast (App. D.2): the matmul in fp16, the fp32 bias added and its
gradient summed in fp32."""

from __future__ import annotations

import torch

from megadalle.models.layers import Linear


def test_linear_under_fp16_autocast_keeps_the_bias_and_its_gradient_fp32() -> None:
    torch.manual_seed(0)
    lin = Linear(24, 40, std=0.2)
    with torch.no_grad():
        lin.bias.uniform_(-1, 1)
    x = torch.randn(3, 500, 24)
    g = torch.randn(3, 500, 40) * 7  # summed over 1,500 rows: beyond fp16's exact integers
    with torch.autocast("cpu", dtype=torch.float16):
        y = lin(x)
    assert y.dtype == torch.float16 and lin.bias.dtype == torch.float32
    y.backward(g.half())
    ref = g.half().double().sum(dim=(0, 1))  # the exact sum of the fp16 output gradient
    assert lin.bias.grad.dtype == torch.float32
    assert (lin.bias.grad.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert not torch.equal(lin.bias.grad, lin.bias.grad.half().float())  # not an fp16 sum widened afterwards
    want = (torch.nn.functional.linear(x.half().float(), lin.weight.half().float()) + lin.bias).half()
    assert (y.float() - want.float()).abs().max() <= 2 * 2**-10 * want.float().abs().max()
    # outside autocast: nn.Linear's own path, bit for bit
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
