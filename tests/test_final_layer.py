"""final_layer (fused LayerNorm + adaLN modulate + linear) against its PyTorch reference, forward and every gradient.

Every comparison uses the three-way rule (tests/tolerance.py) with an fp64 reference built from the same inputs.
The default set is a handful of representative shapes that the CPU interpreter runs quickly; `-m full` sweeps
B x T x D x O x dtype; `-m gpu` adds torch.compile, DiT's real output widths and offsets past 2^31.
"""
import importlib
import itertools

import pytest
import torch

from dit_fast.kernels.final_layer import MAX_D, final_layer, final_layer_ref
from tests.tolerance import assert_three_way

final_layer_module = importlib.import_module("dit_fast.kernels.final_layer")  # its launchers, for configs

GRAD_NAMES = ("dx", "dshift", "dscale", "dweight", "dbias")


def make_inputs(B, T, D, O, dtype, device, seed=0, strided=False):
    """Fresh random (x, mod, weight, bias, grad_out) in `dtype` on `device`.

    shift, scale come later from mod.chunk(2, dim=1), strided views as in DiT. strided=True also gives x a row
    stride larger than D (a slice of a wider tensor), weight a transposed layout and grad_out a non-unit
    last-dim stride.
    """
    gen = torch.Generator().manual_seed(seed)
    width = D + 8 if strided else D
    x_wide = torch.randn(B, T, width, generator=gen) * 2 + 0.5  # (B, T, width)
    mod = torch.randn(B, 2 * D, generator=gen) * 0.5  # (B, 2D)
    weight = torch.randn(D, O, generator=gen).t() if strided else torch.randn(O, D, generator=gen)  # (O, D)
    weight = weight / D**0.5
    bias = torch.randn(O, generator=gen) * 0.1  # (O,)
    grad_out = torch.randn(B, O, T, generator=gen).transpose(1, 2) if strided else torch.randn(B, T, O, generator=gen)
    x_wide, mod, weight, bias, grad_out = (t.to(device=device, dtype=dtype) for t in (x_wide, mod, weight, bias, grad_out))
    return x_wide[..., :D], mod, weight, bias, grad_out  # x (B, T, D): a view when strided


def forward_backward(fn, x, mod, weight, bias, grad_out):
    """Run fn on fresh leaves copied from the inputs (keeping x's layout); returns out and the five gradients."""
    x = x.detach().requires_grad_()  # same storage, so a strided x stays strided
    mod, weight, bias = (t.detach().clone().requires_grad_() for t in (mod, weight, bias))
    shift, scale = mod.chunk(2, dim=1)  # (B, D) each, row stride 2D
    out = fn(x, shift, scale, weight, bias)
    grads = torch.autograd.grad(out, (x, shift, scale, weight, bias), grad_out)
    return out.detach(), grads


def poison_allocator(device):
    """On CUDA, hand the caching allocator a NaN-filled block first, so unwritten outputs show up as NaN."""
    if device.type == "cuda":
        torch.full((64 * 1024 * 1024,), float("nan"), device=device)


def check_against_reference(inputs, device):
    """Three-way check of the output and all five gradients of final_layer on these inputs."""
    x = inputs[0]
    ref = forward_backward(final_layer_ref, *(t.double() for t in inputs))
    same_dtype = forward_backward(final_layer_ref, *inputs)
    poison_allocator(device)
    op = forward_backward(final_layer, *inputs)
    assert op[0].dtype == x.dtype
    assert_three_way(op[0], ref[0], same_dtype[0], "out")
    for name, g, g_ref, g_same in zip(GRAD_NAMES, op[1], ref[1], same_dtype[1]):
        assert g.dtype == x.dtype, f"{name} has dtype {g.dtype}"
        assert_three_way(g, g_ref, g_same, name)


DEFAULT_CASES = [
    # B, T, D, O, dtype, strided x / weight / grad_out
    pytest.param(3, 7, 1000, 48, torch.float32, True, id="D1000-O48-fp32-strided"),
    pytest.param(1, 256, 1152, 32, torch.bfloat16, False, id="DiT-XL2-bf16"),
    pytest.param(3, 1, 384, 48, torch.float16, False, id="T1-fp16"),
    pytest.param(3, 7, 72, 32, torch.bfloat16, True, id="D72-bf16-strided"),
    pytest.param(2, 5, 96, 200, torch.float32, False, id="O200-fp32"),
    pytest.param(2, 3, 64, 512, torch.bfloat16, False, id="O512-bf16"),
]


@pytest.mark.parametrize("B, T, D, O, dtype, strided", DEFAULT_CASES)
def test_matches_reference(B, T, D, O, dtype, strided, device):
    inputs = make_inputs(B, T, D, O, dtype, device, strided=strided)
    x, _, weight, _, grad_out = inputs
    assert (x.stride(1) != D and weight.stride(1) != 1 and grad_out.stride(2) != 1) == strided
    check_against_reference(inputs, device)


@pytest.mark.full
@pytest.mark.parametrize(
    "B, T, D, O, dtype",
    list(itertools.product((1, 3), (1, 7, 256), (72, 384, 1000, 1152), (32, 48),
                           (torch.float32, torch.bfloat16, torch.float16))),
)
def test_matches_reference_sweep(B, T, D, O, dtype, device):
    check_against_reference(make_inputs(B, T, D, O, dtype, device, seed=B * T + D + O), device)


def test_per_sample_modulation(device):
    """Samples with very different statistics and shift/scale: a kernel reading the wrong sample's rows fails."""
    B, T, D, O = 4, 9, 136, 32
    x, mod, weight, bias, grad_out = make_inputs(B, T, D, O, torch.float32, device)
    magnitude = torch.tensor([0.01, 0.3, 3.0, 30.0], device=device)  # (B,)
    x = x * magnitude[:, None, None] + 5 * torch.arange(B, device=device)[:, None, None]  # (B, T, D)
    mod = mod * magnitude.flip(0)[:, None]  # (B, 2D)
    check_against_reference((x, mod, weight, bias, grad_out), device)
    shift, scale = mod.chunk(2, dim=1)
    whole = final_layer(x, shift, scale, weight, bias)  # (B, T, O)
    for i in range(B):
        alone = final_layer(x[i : i + 1], shift[i : i + 1], scale[i : i + 1], weight, bias)  # (1, T, O)
        assert torch.equal(whole[i : i + 1], alone), f"sample {i} depends on the rest of the batch"


@pytest.mark.parametrize("block_m,block_k", [(16, 32), (64, 16)])
def test_forward_launch_configs_match_the_reference(block_m, block_k, device):
    """Explicit forward configs (bench/kernel_sweep.py's overrides): other token and column blocks, same
    output and saved h, with T and D not multiples of the blocks."""
    x, mod, weight, bias, _ = make_inputs(3, 37, 72, 8, torch.float32, device, seed=5)
    shift, scale = mod.chunk(2, dim=1)
    config = final_layer_module.ForwardConfig(block_m, block_k, 1)
    out, h, _, _ = final_layer_module._launch_forward(x, shift, scale, weight, bias, 1e-6, config)
    x64, shift64, scale64 = x.double(), shift.double(), scale.double()
    ref_h = torch.nn.functional.layer_norm(x64, (72,), eps=1e-6) * (1 + scale64[:, None]) + shift64[:, None]
    torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, final_layer_ref(x64, shift64, scale64, weight.double(), bias.double()).float(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_gradcheck_float64(device):
    """Analytic gradients against finite differences, in float64 (the kernels compute in fp64 for fp64 inputs)."""
    x, mod, weight, bias, _ = make_inputs(2, 2, 10, 3, torch.float64, device)
    leaves = tuple(t.detach().clone().requires_grad_() for t in (x, mod, weight, bias))

    def fn(x, mod, weight, bias):
        shift, scale = mod.chunk(2, dim=1)  # strided views, as in DiT
        return final_layer(x, shift, scale, weight, bias)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_is_deterministic(device):
    """Two backward passes give bit-identical gradients (several T-chunks and dweight splits, no atomics)."""
    inputs = make_inputs(3, 40, 160, 48, torch.bfloat16, device)
    first = forward_backward(final_layer, *inputs)
    second = forward_backward(final_layer, *inputs)
    assert torch.equal(first[0], second[0]), "out differs between runs"
    for name, a, b in zip(GRAD_NAMES, first[1], second[1]):
        assert torch.equal(a, b), f"{name} differs between runs"


def test_d_over_cap_is_rejected(device):
    x, mod, weight, bias, _ = make_inputs(1, 1, MAX_D + 1, 4, torch.float32, device)
    shift, scale = mod.chunk(2, dim=1)
    with pytest.raises(ValueError, match=f"D <= {MAX_D}"):
        final_layer(x, shift, scale, weight, bias)


def _bad(name):
    """Valid inputs (B=2, T=3, D=16, O=4) with one argument replaced by `name`'s bad value."""
    x, mod, weight, bias, _ = make_inputs(2, 3, 16, 4, torch.float32, "cpu")
    shift, scale = mod.chunk(2, dim=1)
    args = {"x": x, "shift": shift, "scale": scale, "weight": weight, "bias": bias}
    bad_values = {
        "x_2d": ("x", x[0]),
        "shift_shape": ("shift", shift[:1]),
        "scale_shape": ("scale", scale[:, :8]),
        "weight_wrong_D": ("weight", weight[:, :8]),
        "bias_wrong_O": ("bias", bias[:3]),
        "weight_dtype": ("weight", weight.half()),
        "x_int": ("x", x.int()),
    }
    key, value = bad_values[name]
    args[key] = value
    return args


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("x_2d", ValueError, r"x must be \(B, T, D\)"),
        ("shift_shape", ValueError, r"shift must be \(B, D\)"),
        ("scale_shape", ValueError, r"scale must be \(B, D\)"),
        ("weight_wrong_D", ValueError, r"weight must be \(O, D\) with D=16"),
        ("bias_wrong_O", ValueError, r"bias must be \(O,\)"),
        ("weight_dtype", TypeError, r"weight has dtype torch.float16; expected x's dtype torch.float32"),
        ("x_int", TypeError, r"x has dtype torch.int32; expected one of"),
    ],
)
def test_bad_inputs_are_rejected(name, error, message, device):
    args = {k: v.to(device) for k, v in _bad(name).items()}
    with pytest.raises(error, match=message):
        final_layer(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("O", (32, 128, 512))
def test_dit_output_widths_gpu(O, dtype, device):
    """DiT-XL's width with the output widths of patch 2, 4 and 8 (compiles within the GPU's shared memory)."""
    check_against_reference(make_inputs(8, 256, 1152, O, dtype, device), device)


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu(device):
    """torch.compile(fullgraph=True) holds the op and its backward without a graph break."""
    inputs = make_inputs(4, 256, 1152, 32, torch.bfloat16, device)
    compiled = torch.compile(final_layer, fullgraph=True)
    ref = forward_backward(final_layer_ref, *(t.double() for t in inputs))
    same_dtype = forward_backward(final_layer_ref, *inputs)
    op = forward_backward(compiled, *inputs)
    assert_three_way(op[0], ref[0], same_dtype[0], "compiled out")
    for name, g, g_ref, g_same in zip(GRAD_NAMES, op[1], ref[1], same_dtype[1]):
        assert_three_way(g, g_ref, g_same, f"compiled {name}")


@pytest.mark.gpu
def test_offsets_past_2_31_gpu(device):
    """B*T*D > 2^31: the last tokens' output and dx, and the full dshift and dbias, match the reference."""
    B, D, O = 2, 1152, 32
    T = 2**31 // (B * D) + 7
    x, mod, weight, bias, grad_out = make_inputs(B, T, D, O, torch.bfloat16, device)
    out, (dx, dshift, _, _, dbias) = forward_backward(final_layer, x, mod, weight, bias, grad_out)
    tail = (slice(B - 1, B), slice(T - 5, T))  # the last sample's last 5 tokens, the largest offsets
    tail_inputs = (x[tail], mod[B - 1 : B], weight, bias, grad_out[tail])
    ref = forward_backward(final_layer_ref, *(t.double() for t in tail_inputs))
    same_dtype = forward_backward(final_layer_ref, *tail_inputs)
    assert_three_way(out[tail], ref[0], same_dtype[0], "out of the last tokens")
    assert_three_way(dx[tail], ref[1][0], same_dtype[1][0], "dx of the last tokens")
    # dshift = (sum over tokens of grad_out) @ weight and dbias = sum of grad_out: cheap to form in fp64.
    grad_sum = grad_out.double().sum(1)  # (B, O)
    dshift_ref = grad_sum @ weight.double()  # (B, D)
    dshift_same = (grad_out.float().sum(1) @ weight.float()).to(x.dtype)
    assert_three_way(dshift, dshift_ref, dshift_same, "dshift")
    assert_three_way(dbias, grad_sum.sum(0), grad_out.float().sum((0, 1)).to(x.dtype), "dbias")
