"""gated_residual against its PyTorch reference (three-way rule, outputs and gradients), with the poisoned
outputs, strided gate views and interpreter bf16 rounding fix of tests/test_ln_modulate.py."""
import importlib
import itertools

import pytest
import torch

from dit_fast.kernels import gated_residual, gated_residual_ref
from tests.determinism import assert_backward_deterministic
from tests.test_ln_modulate import DTYPES, check_against_reference

gr = importlib.import_module("dit_fast.kernels.gated_residual")  # the module (the package exports the function)


def make_inputs(B: int, T: int, D: int, dtype: torch.dtype, device) -> dict:
    """Random x, y (B, T, D) and gate, the strided (B, D) view that chunk(6, dim=1) gives, as in DiT."""
    gate = torch.randn(B, 6 * D, dtype=dtype, device=device).chunk(6, dim=1)[2]  # (B, D), row stride 6*D
    x = torch.randn(B, T, D, dtype=dtype, device=device)
    y = torch.randn(B, T, D, dtype=dtype, device=device)
    return {"x": x, "y": y, "gate": gate}


# Batch 1 and > 1, T = 1 / odd / 256, D below, at and past the 128-column block (72, 384, 1000, 1152).
DEFAULT_CASES = [
    (3, 7, 72, "fp32"),
    (3, 1, 1000, "bf16"),
    (1, 7, 384, "fp16"),
    (3, 256, 1152, "bf16"),
]


@pytest.mark.parametrize("B,T,D,dtype", DEFAULT_CASES, ids=[f"B{b}-T{t}-D{d}-{dt}" for b, t, d, dt in DEFAULT_CASES])
def test_forward_and_gradients(B, T, D, dtype, device):
    check_against_reference(gated_residual, gated_residual_ref, make_inputs(B, T, D, DTYPES[dtype], device), ("out",))


FULL_CASES = list(itertools.product([1, 3], [1, 7, 256], [72, 384, 1000, 1152], list(DTYPES)))


@pytest.mark.full
@pytest.mark.parametrize("B,T,D,dtype", FULL_CASES, ids=[f"B{b}-T{t}-D{d}-{dt}" for b, t, d, dt in FULL_CASES])
def test_forward_and_gradients_full(B, T, D, dtype, device):
    check_against_reference(gated_residual, gated_residual_ref, make_inputs(B, T, D, DTYPES[dtype], device), ("out",))


def test_each_sample_uses_its_own_gate(device):
    """Samples get very different gates, so reading another sample's gate (e.g. by program id) fails."""
    inputs = make_inputs(4, 5, 72, torch.float32, device)
    inputs["gate"].add_(100.0 * torch.arange(4, dtype=torch.float32, device=device)[:, None])  # stays strided
    check_against_reference(gated_residual, gated_residual_ref, inputs, ("out",))


def test_strided_x_and_y(device):
    """x as a slice of wider rows (a strided view), y as a transpose (last dim not contiguous)."""
    B, T, D = 2, 6, 40
    inputs = make_inputs(B, T, D, torch.float32, device)
    inputs["x"] = torch.randn(B, T, 2 * D, device=device)[..., :D]  # row stride 2*D
    inputs["y"] = torch.randn(B, D, T, device=device).transpose(1, 2)  # column stride T
    check_against_reference(gated_residual, gated_residual_ref, inputs, ("out",))


def test_any_width_works(device):
    """D is tiled in 128-column blocks, so widths past ln_modulate's 8192 cap work too."""
    inputs = make_inputs(2, 2, 8200, torch.float32, device)
    check_against_reference(gated_residual, gated_residual_ref, inputs, ("out",))


def test_gradcheck_float64(device):
    """torch.autograd.gradcheck in float64 (the kernels compute in fp64 for fp64 inputs) on a small shape."""
    leaves = [t.detach().clone().requires_grad_() for t in make_inputs(2, 3, 6, torch.float64, device).values()]
    assert torch.autograd.gradcheck(gated_residual, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_backward_is_deterministic(device):
    """Two backward passes on the same inputs give bit-identical gradients (no atomics)."""
    assert_backward_deterministic(gated_residual, make_inputs(2, 64, 384, torch.bfloat16, device))


def test_bad_inputs_are_rejected(device):
    x = torch.randn(2, 3, 8, device=device)
    gate = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 8\).*got \(2, 3, 8\)"):
        gated_residual(x, x, x)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3, 8\).*got \(2, 3, 7\)"):
        gated_residual(x, torch.randn(2, 3, 7, device=device), gate)
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\); got shape \(6, 8\)"):
        gated_residual(x.reshape(6, 8), x.reshape(6, 8), gate)
    with pytest.raises(TypeError, match="y has dtype torch.float16; expected x's dtype torch.float32"):
        gated_residual(x, x.half(), gate)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        gated_residual(x.int(), x.int(), gate.int())


@pytest.mark.parametrize("rows,block_d,rows_per_chunk", [(1, 64, 2), (2, 16, 4), (4, 32, 8)])
def test_every_launch_config_matches_the_reference(rows, block_d, rows_per_chunk, device):
    """Explicit launch configs (bench/kernel_sweep.py's overrides), forward and backward, fp32, T = 7 so that
    tiles and chunks end mid-sample."""
    inputs = make_inputs(3, 7, 40, torch.float32, device)
    config = gr.LaunchConfig(rows, block_d, 1, rows_per_chunk)
    grad_out = torch.randn_like(inputs["x"])
    out = gr._forward(inputs["x"], inputs["y"], inputs["gate"], config)
    dy, dgate = gr._backward(grad_out, inputs["y"], inputs["gate"], config)
    leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref = gated_residual_ref(**leaves)
    _, ref_dy, ref_dgate = torch.autograd.grad(ref, list(leaves.values()), grad_out.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dy, ref_dy.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgate, ref_dgate.float(), rtol=1e-4, atol=1e-4)
