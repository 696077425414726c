"""ln_modulate's TMA forward and backward (kernels/ln_modulate_tma.py): the row layout, launch configs against
the float64 reference, and when `_forward` / `_backward` take them or fall back to the register-tile kernels.

The default-path tests in tests/test_ln_modulate.py already run it (D = 72, 384, 1152 take TMA; D = 1000
cannot); these pin the cases a default launch does not reach: several tiles per persistent program, tiles
that cross samples and the rows' end, a row of one power-of-two part, and misaligned rows.
"""
import importlib

import pytest
import torch

from dit_fast.kernels import ln_modulate, ln_modulate_ref
from tests.test_ln_modulate import make_inputs

ln = importlib.import_module("dit_fast.kernels.ln_modulate")
tma = importlib.import_module("dit_fast.kernels.ln_modulate_tma")


@pytest.mark.parametrize(
    "D,element_size,expected",
    [
        (1152, 2, (64, 16, 2)),  # DiT-XL in bf16: 18 segments of 128 bytes = 16 + 2
        (1152, 4, (32, 32, 4)),
        (1024, 2, (64, 16, 0)),  # one part
        (384, 8, (16, 16, 8)),
        (72, 2, (8, 8, 1)),  # 9 segments of 16 bytes
        (1000, 2, None),  # 125 segments of 16 bytes: no two powers of two
        (36, 2, None),  # 72 bytes: no segment of at least 16 bytes divides it
    ],
)
def test_tma_layout(D, element_size, expected):
    layout = tma.tma_layout(D, element_size)
    assert (tuple(layout) if layout else None) == expected
    if layout:
        assert layout.seg * (layout.na + layout.nb) == D


def _inputs(B, T, D, dtype, device):
    """x and the strided (B, D) shift/scale views of tests/test_ln_modulate.py's inputs."""
    inputs = make_inputs(B, T, D, dtype, device, residual=False)
    return inputs["x"], inputs["shift"], inputs["scale"]


@pytest.mark.parametrize("D", [48, 64], ids=["two-parts", "one-part"])
@pytest.mark.parametrize("T", [7, 8], ids=["tiles-cross-samples", "tiles-in-one-sample"])
@pytest.mark.parametrize("rows,programs_per_sm", [(1, 1), (2, 2), (4, 1)])
def test_tma_configs_match_the_reference(rows, programs_per_sm, T, D, device):
    """Explicit TmaConfigs in fp32: h, mean and rstd against float64. With few persistent programs each
    one loops over several tiles; T = 7 puts sample boundaries and the last rows inside tiles."""
    B = 3
    x, shift, scale = _inputs(B, T, D, torch.float32, device)
    _, h, mean, rstd = ln._forward(x, None, None, shift, scale, 1e-6, tma.TmaConfig(rows, 1, 2, programs_per_sm))
    x64 = x.double()
    ref_mean = x64.mean(-1).flatten()
    ref_rstd = (x64.var(-1, unbiased=False).flatten() + 1e-6).rsqrt()
    torch.testing.assert_close(h, ln_modulate_ref(x64, shift.double(), scale.double()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [48, 64], ids=["two-parts", "one-part"])
@pytest.mark.parametrize("rows,rows_per_chunk", [(1, 2), (2, 2), (2, 8), (4, 4)])
def test_tma_backward_configs_match_the_reference(rows, rows_per_chunk, D, device):
    """Explicit TmaBackwardConfigs in fp32: dx, dshift and dscale against float64, with one or several tiles
    per chunk and several chunks per sample (T = 8)."""
    B, T = 3, 8
    x, shift, scale = _inputs(B, T, D, torch.float32, device)
    _, _, mean, rstd = ln._forward(x, None, None, shift, scale, 1e-6)
    grad_h = torch.randn_like(x)
    dx, _, _, dshift, dscale = ln._backward(
        grad_h, None, x, None, None, scale, mean, rstd, tma.TmaBackwardConfig(rows, 1, 2, rows_per_chunk)
    )
    leaves = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ref = torch.autograd.grad(ln_modulate_ref(*leaves), leaves, grad_h.double())
    for name, got, want in zip(("dx", "dshift", "dscale"), (dx, dshift, dscale), ref):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_tma_backward_needs_tiles_that_divide_T(device):
    """A tile may not straddle two samples' chunks (its TMA store would write the neighbour's rows): T = 7
    with 2-row tiles is refused when forced, and the default rule takes the register-tile kernel there."""
    x, shift, scale = _inputs(2, 7, 64, torch.float32, device)
    _, _, mean, rstd = ln._forward(x, None, None, shift, scale, 1e-6)
    grad_h = torch.randn_like(x)
    with pytest.raises(ValueError, match="tiles dividing T=7"):
        ln._backward(grad_h, None, x, None, None, scale, mean, rstd, tma.TmaBackwardConfig(2, 1, 2, 4))
    default = ln._backward(grad_h, None, x, None, None, scale, mean, rstd)
    tile = ln._backward(grad_h, None, x, None, None, scale, mean, rstd, ln.backward_config(14, 64, False))
    for got, want in zip(default, tile):
        assert (got is None and want is None) or torch.equal(got, want)


def test_tma_and_register_tile_forwards_agree(device):
    """The two kernels of the plain forward, default rules, bf16 at DiT-XL width: the same to an ulp or two."""
    x, shift, scale = _inputs(2, 16, 1152, torch.bfloat16, device)
    _, h_tma, mean_tma, rstd_tma = ln._forward(x, None, None, shift, scale, 1e-6, tma.tma_config(1152))
    _, h_tile, mean_tile, rstd_tile = ln._forward(x, None, None, shift, scale, 1e-6, ln.forward_config(32, 1152, False))
    torch.testing.assert_close(h_tma.float(), h_tile.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mean_tma, mean_tile, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd_tma, rstd_tile, rtol=1e-5, atol=1e-6)


def test_misaligned_rows_fall_back(device):
    """Rows TMA cannot address (row stride of 1153 bf16 elements, odd offset) run the register-tile kernel
    by default and match the reference; forcing a TmaConfig on them, or on the residual variant, is an error."""
    B, T, D = 2, 4, 1152
    padded = torch.randn(B, T, D + 1, dtype=torch.bfloat16, device=device)
    x = padded[..., 1:]  # (B, T, D) rows of stride D + 1 starting one element in
    _, shift, scale = _inputs(B, T, D, torch.bfloat16, device)
    assert not tma.can_use_tma([ln.as_rows(x, D)], D)
    torch.testing.assert_close(
        ln_modulate(x, shift, scale).float(), ln_modulate_ref(x.double(), shift.double(), scale.double()).float(),
        rtol=2e-2, atol=3e-2,
    )
    with pytest.raises(ValueError, match="TmaConfig"):
        ln._forward(x, None, None, shift, scale, 1e-6, tma.TmaConfig(4, 1, 2, 1))
    with pytest.raises(ValueError, match="no TMA forward"):
        aligned = x.contiguous()
        ln._forward(aligned, aligned, shift, shift, scale, 1e-6, tma.TmaConfig(4, 1, 2, 1))


def test_rows_traced_by_torch_compile_take_the_register_tile_kernel():
    """torch.compile traces ops with fake tensors; those must not reach the host-descriptor TMA launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert tma.can_use_tma([torch.empty(64, 1152, dtype=torch.bfloat16)], 1152)
    with FakeTensorMode():
        assert not tma.can_use_tma([torch.empty(64, 1152, dtype=torch.bfloat16)], 1152)
