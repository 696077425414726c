"""bias_gelu against its PyTorch reference (three-way rule, output and both gradients), with the poisoned
outputs and interpreter bf16 rounding fix of tests/test_ln_modulate.py.

On the CPU the kernels run under the Triton interpreter, which takes the exact tanh path for every dtype;
the FAST_TANH (tanh.approx.f32) path is covered by tests/gpu/test_kernels_gpu.py.
"""
import importlib
import itertools

import pytest
import torch

from dit_fast.kernels import bias_gelu, bias_gelu_ref
from tests.determinism import assert_backward_deterministic
from tests.test_ln_modulate import DTYPES, check_against_reference

bg = importlib.import_module("dit_fast.kernels.bias_gelu")  # the module (the package exports the function)


def make_inputs(M: int, H: int, dtype: torch.dtype, device, scale: float = 2.0) -> dict:
    """Random z (M, H) spread wide enough to reach GELU's tails, and bias (H,)."""
    z = scale * torch.randn(M, H, dtype=torch.float32, device=device)
    bias = torch.randn(H, dtype=torch.float32, device=device)
    return {"z": z.to(dtype), "bias": bias.to(dtype)}


def check(inputs: dict) -> None:
    check_against_reference(bias_gelu, bias_gelu_ref, inputs, ("a",))


# M = 1 / 7 / 300 (300 rows: several row chunks and a ragged last tile of the 32-row tiles), H = 72 and
# 1000 (one ragged column block of 128 / four of 256, the last ragged), DiT-XL's 4608 once at small M.
DEFAULT_CASES = [
    (1, 72, "fp32"),
    (7, 1000, "bf16"),
    (7, 72, "fp16"),
    (300, 72, "bf16"),
    (300, 1000, "fp32"),
    (300, 1000, "fp16"),
    (3, 4608, "bf16"),
]


@pytest.mark.parametrize("M,H,dtype", DEFAULT_CASES, ids=[f"M{m}-H{h}-{dt}" for m, h, dt in DEFAULT_CASES])
def test_forward_and_gradients(M, H, dtype, device):
    check(make_inputs(M, H, DTYPES[dtype], device))


FULL_CASES = list(itertools.product([1, 7, 300], [72, 1000, 4608], list(DTYPES)))


@pytest.mark.full
@pytest.mark.parametrize("M,H,dtype", FULL_CASES, ids=[f"M{m}-H{h}-{dt}" for m, h, dt in FULL_CASES])
def test_forward_and_gradients_full(M, H, dtype, device):
    check(make_inputs(M, H, DTYPES[dtype], device))


def test_three_dim_input(device):
    """(B, T, H) activations, as the MLP gives them; the output keeps the shape."""
    z = 2.0 * torch.randn(2, 5, 72, device=device)
    check({"z": z, "bias": torch.randn(72, device=device)})


def test_strided_z(device):
    """z as a slice of wider rows (row stride 2H: used in place) and as a transpose (column stride != 1:
    copied), in 2 and 3 dims."""
    H = 40
    bias = torch.randn(H, device=device)
    sliced = torch.randn(9, 2 * H, device=device)[:, :H]
    assert sliced.stride() == (2 * H, 1)
    check({"z": sliced, "bias": bias})
    check({"z": torch.randn(H, 9, device=device).t(), "bias": bias})
    check({"z": torch.randn(2, H, 6, device=device).transpose(1, 2), "bias": bias})
    check({"z": torch.randn(2, 6, H, device=device), "bias": torch.randn(2 * H, device=device)[::2]})  # strided bias


def test_strided_grad(device):
    """The backward reads a non-contiguous incoming gradient (a transpose) correctly."""
    inputs = make_inputs(6, 40, torch.float32, device)
    grad = torch.randn(40, 6, device=device).t()  # (6, 40), column stride 6
    dz, dbias = bg._backward(grad, inputs["z"], inputs["bias"])
    z, b = (t.double().requires_grad_() for t in inputs.values())
    ref_dz, ref_dbias = torch.autograd.grad(bias_gelu_ref(z, b), (z, b), grad.double())
    torch.testing.assert_close(dz, ref_dz.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbias, ref_dbias.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # u^3 of 1e30 under the interpreter (numpy)
def test_tails_fp32(device):
    """u = z + bias from -12 to 12: GELU's tails (0.5 * (1 + tanh) ~ 1e-30 on the left, 1 on the right) are
    accurate, and nothing overflows."""
    z = torch.linspace(-12.0, 12.0, 7 * 64, device=device).reshape(7, 64)
    check({"z": z, "bias": torch.zeros(64, device=device)})
    extreme = torch.tensor([[-1e30, -100.0, 100.0, 1e30, 0.0]], device=device)
    a = bias_gelu(extreme, torch.zeros(5, device=device))
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.0, 100.0, 1e30, 0.0]], device=device))


def test_gradcheck_float64(device):
    """torch.autograd.gradcheck in float64 (the kernels compute in fp64 for fp64 inputs), 2 and 3 dims."""
    for shape in ((5, 6), (2, 3, 7)):
        z = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        bias = torch.randn(shape[-1], dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(bias_gelu, (z, bias), eps=1e-6, atol=1e-7, fast_mode=True)


def test_backward_is_deterministic(device):
    """Two backward passes on the same inputs give bit-identical dz and dbias (no atomics)."""
    assert_backward_deterministic(bias_gelu, make_inputs(300, 1000, torch.bfloat16, device))


def test_dbias_sums_the_unrounded_dz(device):
    """dbias is the fp32 sum of dz before dz is rounded to bf16, so it is the fp64 reference rounded once:
    within half a bf16 ulp per element (a sum of 300 rounded dz would drift past that in some columns).
    Exact tanh: on CUDA the default tanh.approx.f32 errs by ~1e-3 per dz, enough to pass half an ulp at random."""
    inputs = make_inputs(300, 72, torch.bfloat16, device)
    grad = torch.randn(300, 72, device=device).bfloat16()
    _, dbias = bg._backward(grad, inputs["z"], inputs["bias"], fast_tanh=False)
    z, b = (t.double().requires_grad_() for t in inputs.values())
    _, ref_dbias = torch.autograd.grad(bias_gelu_ref(z, b), (z, b), grad.double())
    half_ulp = torch.exp2(torch.floor(torch.log2(ref_dbias.abs())) - 8)  # bf16: 8 significant bits
    assert ((dbias.double() - ref_dbias).abs() <= half_ulp * (1 + 1e-3)).all()
    rounded_sum = bg._backward(grad, inputs["z"], inputs["bias"], fast_tanh=False)[0].double().sum(0)  # autograd's sum
    assert ((rounded_sum - ref_dbias).abs() > half_ulp).any(), "the test does not tell the two sums apart"


def test_empty_input(device):
    z = torch.randn(0, 8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    a = bias_gelu(z, bias)
    assert a.shape == (0, 8)
    dz, dbias = torch.autograd.grad(a, (z, bias), torch.randn_like(a))
    assert dz.shape == (0, 8) and torch.equal(dbias, torch.zeros_like(bias))


def test_bad_inputs_are_rejected(device):
    z = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) to match z \(3, 8\); got \(7,\)"):
        bias_gelu(z, torch.randn(7, device=device))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) to match z \(3, 8\); got \(1, 8\)"):
        bias_gelu(z, torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match="bias has dtype torch.float16; expected z's dtype torch.float32"):
        bias_gelu(z, torch.randn(8, device=device).half())
    with pytest.raises(TypeError, match="z has dtype torch.int32"):
        bias_gelu(z.int(), torch.zeros(8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"z must be \(\.\.\., H\) with H >= 1; got shape \(\)"):
        bias_gelu(torch.tensor(1.0, device=device), torch.randn(1, device=device))
    with pytest.raises(ValueError, match="fast_tanh=True needs fp32/bf16/fp16 on CUDA"):  # fp64 everywhere
        bg._forward(z.double(), torch.randn(8, device=device, dtype=torch.float64), fast_tanh=True)
    with pytest.raises(ValueError, match="rows_per_chunk must be >= 1 for the backward; got 0"):
        bg._backward(z, z, torch.randn(8, device=device), bg.LaunchConfig(4, 8, 1))


@pytest.mark.parametrize("block_m,block_h,rows_per_chunk", [(1, 64, 3), (4, 16, 6), (4, 16, 8), (8, 32, 32)])
def test_every_launch_config_matches_the_reference(block_m, block_h, rows_per_chunk, device):
    """Explicit launch configs (a sweep's overrides), forward and backward, fp32, M = 30 and H = 40, so that
    programs walk several tiles per chunk, the last chunk and tile are ragged and so is the last column block;
    6 rows per chunk in 4-row tiles leave every chunk's second tile half empty."""
    inputs = make_inputs(30, 40, torch.float32, device)
    config = bg.LaunchConfig(block_m, block_h, 1, rows_per_chunk)
    grad = torch.randn(30, 40, device=device)
    a = bg._forward(inputs["z"], inputs["bias"], config)
    dz, dbias = bg._backward(grad, inputs["z"], inputs["bias"], config)
    z, b = (t.double().requires_grad_() for t in inputs.values())
    ref = bias_gelu_ref(z, b)
    ref_dz, ref_dbias = torch.autograd.grad(ref, (z, b), grad.double())
    torch.testing.assert_close(a, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz, ref_dz.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbias, ref_dbias.float(), rtol=1e-5, atol=1e-5)


def test_launch_rule_keeps_chunks_whole_tiles_within_the_grid_limit():
    H = 4608
    for M in (1, 7, 300, 65536, 466036, 2**31 // H + 3, 2**26):
        cfg = bg.backward_config(M, H)
        assert cfg.rows_per_chunk % cfg.block_m == 0 and triton_cdiv(M, cfg.rows_per_chunk) <= bg.MAX_CHUNKS


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_interpreter_never_takes_the_fast_tanh():
    if not bg.RUNS_IN_INTERPRETER:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    for dtype in DTYPES.values():
        assert not bg.uses_fast_tanh(dtype, torch.device("cpu"))
