"""GPU-only kernel tests: DiT-XL/2 shapes in bf16 for all the ops, tensors past 2^31 elements, and
torch.compile(fullgraph=True) of a block built from the ops (forward and backward, no graph break).

Run on a GPU machine with `pytest -m gpu tests/gpu`. The three-way rule compares against a float64
reference (an H200 has memory to spare for it), via tests/test_ln_modulate.check_against_reference, which
also poisons the outputs with NaN blocks through the caching allocator before each call.
"""
import importlib

import pytest
import torch

from dit_fast.fused_blocks import FusedMlp
from dit_fast.kernels import (
    bias_gelu,
    bias_gelu_ref,
    final_layer,
    final_layer_ref,
    gated_residual,
    gated_residual_ln_modulate,
    gated_residual_ln_modulate_ref,
    gated_residual_ref,
    ln_modulate,
    ln_modulate_ref,
)
from tests.test_ln_modulate import check_against_reference
from tests.tolerance import assert_three_way

bg = importlib.import_module("dit_fast.kernels.bias_gelu")  # the module (the package exports the function)

pytestmark = pytest.mark.gpu

XL_WIDTH = 1152  # DiT-XL/2 hidden size
XL_FINAL_OUT = 2 * 2 * 8  # patch 2 x 2, 4 latent channels x 2 (learned sigma)
XL_MLP_HIDDEN = 4 * XL_WIDTH  # 4608


def _adaln_views(B: int, D: int, n: int, dtype=torch.bfloat16) -> tuple:
    """The strided (B, D) views that DiT's adaLN modulation gives: Linear output (B, n*D) chunked n ways."""
    return torch.randn(B, n * D, device="cuda", dtype=dtype).chunk(n, dim=1)


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    torch.cuda.empty_cache()


@pytest.mark.parametrize("B,T", [(256, 256), (256, 1024)], ids=["256px-B256", "512px-B256"])
def test_xl_shapes_bf16(B, T):
    D = XL_WIDTH
    x, y = torch.randn(2, B, T, D, device="cuda", dtype=torch.bfloat16)  # (B, T, D) each
    shift, scale, gate, *_ = _adaln_views(B, D, 6)
    check_against_reference(ln_modulate, ln_modulate_ref, {"x": x, "shift": shift, "scale": scale}, ("h",))
    check_against_reference(
        gated_residual_ln_modulate,
        gated_residual_ln_modulate_ref,
        {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale},
        ("x_new", "h"),
    )
    check_against_reference(gated_residual, gated_residual_ref, {"x": x, "y": y, "gate": gate}, ("out",))
    final_shift, final_scale = _adaln_views(B, D, 2)
    weight = torch.randn(XL_FINAL_OUT, D, device="cuda", dtype=torch.bfloat16) / D**0.5  # (O, D)
    bias = torch.randn(XL_FINAL_OUT, device="cuda", dtype=torch.bfloat16)  # (O,)
    check_against_reference(
        final_layer,
        final_layer_ref,
        {"x": x, "shift": final_shift, "scale": final_scale, "weight": weight, "bias": bias},
        ("out",),
    )


# B * T * D = 16 * 32768 * 4608 = 2.42e9 > 2^31 elements (4.8 GB per bf16 tensor); rows past
# 2^31 / D = 466,033 have element offsets that overflow int32.
HUGE_B, HUGE_T, HUGE_D = 16, 32768, 4608
FIRST_ROW_PAST_INT32 = 2**31 // HUGE_D + 1


def _checked_rows() -> torch.Tensor:
    """Rows compared to the reference: both ends, both sides of the int32 boundary, and a random sample."""
    M = HUGE_B * HUGE_T
    edges = torch.tensor([0, 1, FIRST_ROW_PAST_INT32 - 1, FIRST_ROW_PAST_INT32, M - 2, M - 1])
    return torch.cat([edges, torch.randint(0, M, (26,))]).cuda()


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, T, D) tensor by flat row index, as (len(rows), 1, D)."""
    return t.reshape(-1, t.shape[-1])[rows].unsqueeze(1)


def _compare_rows(op_rows: tuple, ref, inputs_of_rows: dict, names: tuple) -> None:
    """Three-way check of the op's outputs on a subset of rows against ref run on those rows alone."""
    ref64 = ref(**{n: v.double() for n, v in inputs_of_rows.items()})
    same = ref(**inputs_of_rows)
    ref64, same = (ref64, same) if isinstance(ref64, tuple) else ((ref64,), (same,))
    for name, o, r64, s in zip(names, op_rows, ref64, same):
        assert_three_way(o, r64, s, name)


def _last_sample_grads(ref, inputs: dict, cotangents: tuple, names: list, convert) -> tuple:
    """Gradients of ref run on the last sample alone, with inputs and cotangents converted by `convert`."""
    leaves = {n: convert(v[-1:].detach()).requires_grad_() for n, v in inputs.items()}
    outputs = ref(**leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(outputs, [leaves[n] for n in names], [convert(c[-1:]) for c in cotangents])


def _compare_last_sample_grads(ref, inputs: dict, cotangents: tuple, grads: dict) -> None:
    """Three-way check of the gradients of the last sample, all of whose rows lie past int32 offsets."""
    names = list(grads)
    ref64 = _last_sample_grads(ref, inputs, cotangents, names, lambda t: t.double())
    same = _last_sample_grads(ref, inputs, cotangents, names, lambda t: t.clone())
    for name, r64, s in zip(names, ref64, same):
        assert_three_way(grads[name][-1:], r64, s, f"d{name} of the last sample")


def test_ln_modulate_past_int32_offsets():
    x = torch.randn(HUGE_B, HUGE_T, HUGE_D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    shift, scale = (t.detach().requires_grad_() for t in _adaln_views(HUGE_B, HUGE_D, 2))
    h = ln_modulate(x, shift, scale)
    rows = _checked_rows()
    sample = rows // HUGE_T
    row_inputs = {"x": _rows(x, rows), "shift": shift[sample], "scale": scale[sample]}
    _compare_rows((_rows(h, rows),), ln_modulate_ref, row_inputs, ("h",))
    grad_h = torch.randn_like(h)
    dx, dshift, dscale = torch.autograd.grad(h, (x, shift, scale), grad_h)
    del h
    grads = {"x": dx, "shift": dshift, "scale": dscale}
    _compare_last_sample_grads(ln_modulate_ref, {"x": x, "shift": shift, "scale": scale}, (grad_h,), grads)


def test_gated_residual_past_int32_offsets():
    x, y = (torch.randn(HUGE_B, HUGE_T, HUGE_D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    gate = _adaln_views(HUGE_B, HUGE_D, 6)[2].detach().requires_grad_()
    out = gated_residual(x, y, gate)
    rows = _checked_rows()
    row_inputs = {"x": _rows(x, rows), "y": _rows(y, rows), "gate": gate[rows // HUGE_T]}
    _compare_rows((_rows(out, rows),), gated_residual_ref, row_inputs, ("out",))
    grad_out = torch.randn_like(out)
    _, dy, dgate = torch.autograd.grad(out, (x, y, gate), grad_out)
    del out
    inputs = {"x": x, "y": y, "gate": gate}
    _compare_last_sample_grads(gated_residual_ref, inputs, (grad_out,), {"y": dy, "gate": dgate})


def test_gated_residual_ln_modulate_past_int32_offsets():
    x, y = (torch.randn(HUGE_B, HUGE_T, HUGE_D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    gate, shift, scale = (t.detach().requires_grad_() for t in _adaln_views(HUGE_B, HUGE_D, 3))
    x_new, h = gated_residual_ln_modulate(x, y, gate, shift, scale)
    rows = _checked_rows()
    sample = rows // HUGE_T
    row_inputs = {
        "x": _rows(x, rows), "y": _rows(y, rows), "gate": gate[sample], "shift": shift[sample], "scale": scale[sample]
    }
    _compare_rows((_rows(x_new, rows), _rows(h, rows)), gated_residual_ln_modulate_ref, row_inputs, ("x_new", "h"))
    cotangents = (torch.randn_like(x_new), torch.randn_like(h))
    grads = torch.autograd.grad((x_new, h), (x, y, gate, shift, scale), cotangents)
    del x_new, h
    inputs = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale}
    _compare_last_sample_grads(gated_residual_ln_modulate_ref, inputs, cotangents, dict(zip(inputs, grads)))


def _bias_gelu_inputs(M: int, H: int = XL_MLP_HIDDEN, scale: float = 2.0) -> dict:
    """bf16 z (M, H), spread to reach GELU's tails, and bias (H,)."""
    return {
        "z": (scale * torch.randn(M, H, device="cuda")).to(torch.bfloat16),
        "bias": torch.randn(H, device="cuda", dtype=torch.bfloat16),
    }


def test_bias_gelu_xl_bf16_fast_tanh():
    """DiT-XL/2 training's MLP activation (M = B*T = 65536, H = 4608), bf16, the default tanh.approx path."""
    assert bg.uses_fast_tanh(torch.bfloat16, torch.device("cuda"))
    check_against_reference(bias_gelu, bias_gelu_ref, _bias_gelu_inputs(256 * 256), ("a",))


def test_bias_gelu_tails_bf16_both_tanh_paths():
    """u = z + bias spread over [-12, 12] (GELU's tails, where tanh.approx's error is absolute), bf16, with the
    tanh.approx path and the exact exp path, output and both gradients against the fp64 reference."""
    M, H = 4096, XL_MLP_HIDDEN
    z = (24.0 * torch.rand(M, H, device="cuda") - 12.0).to(torch.bfloat16)
    bias = (0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
    grad = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    z64, b64 = z.double().requires_grad_(), bias.double().requires_grad_()
    zs, bs = z.clone().requires_grad_(), bias.clone().requires_grad_()
    ref64, same = bias_gelu_ref(z64, b64), bias_gelu_ref(zs, bs)
    ref64_grads = torch.autograd.grad(ref64, (z64, b64), grad.double())
    same_grads = torch.autograd.grad(same, (zs, bs), grad)
    for fast_tanh in (True, False):
        a = bg._forward(z, bias, fast_tanh=fast_tanh)
        dz, dbias = bg._backward(grad, z, bias, fast_tanh=fast_tanh)
        assert_three_way(a, ref64, same, f"a (fast_tanh={fast_tanh})")
        assert_three_way(dz, ref64_grads[0], same_grads[0], f"dz (fast_tanh={fast_tanh})")
        assert_three_way(dbias, ref64_grads[1], same_grads[1], f"dbias (fast_tanh={fast_tanh})")


# M * H = 466,036 * 4608 = 2,147,493,888 > 2^31 elements (4.3 GB per bf16 tensor): the last three rows start
# past int32 offsets and the one before them crosses the boundary.
BIAS_GELU_HUGE_M = 2**31 // XL_MLP_HIDDEN + 3


def test_bias_gelu_past_int32_offsets():
    M, H = BIAS_GELU_HUGE_M, XL_MLP_HIDDEN
    inputs = _bias_gelu_inputs(M)
    z, bias = inputs["z"].requires_grad_(), inputs["bias"].requires_grad_()
    a = bias_gelu(z, bias)
    rows = torch.cat([torch.tensor([0, 1, M - 5, M - 4, M - 3, M - 2, M - 1]), torch.randint(0, M, (25,))]).cuda()
    _compare_rows((a[rows].detach(),), bias_gelu_ref, {"z": z[rows].detach(), "bias": bias.detach()}, ("a",))
    grad = torch.randn_like(a)
    dz, dbias = torch.autograd.grad(a, (z, bias), grad)
    del a

    def row_grad(convert):  # dz of the checked rows, by the reference run on those rows alone
        z_rows = convert(z[rows].detach()).requires_grad_()
        return torch.autograd.grad(bias_gelu_ref(z_rows, convert(bias.detach())), z_rows, convert(grad[rows]))[0]

    assert_three_way(dz[rows], row_grad(lambda t: t.double()), row_grad(lambda t: t.clone()), "dz rows")
    ref_dbias = torch.zeros(H, dtype=torch.float64, device="cuda")
    for start in range(0, M, 65536):  # the fp64 reference in slices of rows
        b64 = bias.detach().double().requires_grad_()
        out = bias_gelu_ref(z[start : start + 65536].detach().double(), b64)
        ref_dbias += torch.autograd.grad(out, b64, grad[start : start + 65536].double())[0]
    # fp32 sums rounded once to bf16 (2^-8 relative), plus the random walk of tanh.approx's errors over M rows
    torch.testing.assert_close(dbias.double(), ref_dbias, rtol=2**-8, atol=2**-8 * ref_dbias.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mlp_torch_compile_fullgraph_matches_eager(dtype):
    """FusedMlp with gradients (fc1 matmul + bias_gelu + fc2) compiled with fullgraph=True: no graph break,
    the same output and gradients as eager, at two batch sizes (the second recompiles)."""
    torch.manual_seed(0)
    mlp = FusedMlp(96, 384).cuda().to(dtype)
    compiled = torch.compile(mlp, fullgraph=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for B in (3, 5):
        x = torch.randn(B, 20, 96, device="cuda", dtype=dtype)
        eager_out, eager_grads = _mlp_forward_backward(mlp, x)
        compiled_out, compiled_grads = _mlp_forward_backward(compiled, x)
        torch.testing.assert_close(compiled_out, eager_out, rtol=tol, atol=tol)
        for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=tol, atol=tol)


def _mlp_forward_backward(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    grads = torch.autograd.grad(out, [x, *model.parameters()], torch.ones_like(out))
    return out.detach(), grads


class _FusedBlock(torch.nn.Module):
    """A DiT-like block wired through all four ops: adaLN-modulated norm, two gated residuals, final layer."""

    def __init__(self, width: int, out_width: int):
        super().__init__()
        self.modulation = torch.nn.Linear(width, 6 * width)
        self.attn_stand_in = torch.nn.Linear(width, width)
        self.mlp_stand_in = torch.nn.Linear(width, width)
        self.final_modulation = torch.nn.Linear(width, 2 * width)
        self.final_linear = torch.nn.Linear(width, out_width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        h = ln_modulate(x, shift_msa, scale_msa)  # (B, T, D)
        x, h = gated_residual_ln_modulate(x, self.attn_stand_in(h), gate_msa, shift_mlp, scale_mlp)
        x = gated_residual(x, self.mlp_stand_in(h), gate_mlp)  # (B, T, D)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)  # (B, D) each
        return final_layer(x, shift, scale, self.final_linear.weight, self.final_linear.bias)  # (B, T, O)


def _forward_backward(model, x, c):
    x = x.detach().requires_grad_()
    out = model(x, c)
    grads = torch.autograd.grad(out, [x, *model.parameters()], torch.ones_like(out))
    return out.detach(), grads


def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True raises on any graph break; a second batch size exercises the recompiled (dynamic) graph."""
    torch.manual_seed(0)
    model = _FusedBlock(width=96, out_width=16).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for B in (3, 5):
        x = torch.randn(B, 20, 96, device="cuda")
        c = torch.randn(B, 96, device="cuda")
        eager_out, eager_grads = _forward_backward(model, x, c)
        compiled_out, compiled_grads = _forward_backward(compiled, x, c)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
        for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["ln_modulate", "gated_residual_ln_modulate", "final_layer", "bias_gelu"])
def test_inductor_launch_as_fast_as_eager_launch(op):
    """Inductor launches our kernels with its own argument types (a float comes in as fp64): the kernels must
    not slow down for it. Before eps was cast in-kernel, the LN forward ran 1.8x slower under torch.compile.
    GPU time of the op's kernels, eager launch against the launch from a compiled function, DiT-XL/2 shape."""
    from bench.environment import kernel_time_ms

    B, T, D = 128, 256, XL_WIDTH
    x, y = (torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = _adaln_views(B, D, 3)
    weight = torch.randn(XL_FINAL_OUT, D, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(XL_FINAL_OUT, device="cuda", dtype=torch.bfloat16)
    mlp = _bias_gelu_inputs(B * T)
    calls = {
        "ln_modulate": lambda: ln_modulate(x, shift, scale),
        "gated_residual_ln_modulate": lambda: gated_residual_ln_modulate(x, y, gate, shift, scale),
        "final_layer": lambda: final_layer(x, shift, scale, weight, bias),
        "bias_gelu": lambda: bias_gelu(mlp["z"], mlp["bias"]),
    }
    compiled = torch.compile(calls[op], fullgraph=True, dynamic=False)
    if op == "ln_modulate":  # compiled code runs its register-tile kernel (ln_modulate_tma.can_use_tma says why)
        ln_module = importlib.import_module("dit_fast.kernels.ln_modulate")
        tile_config = ln_module.forward_config(B * T, D, False)
        calls[op] = lambda: ln_module._forward(x, None, None, shift, scale, 1e-6, tile_config)
    with torch.no_grad():
        eager_ms, compiled_ms = kernel_time_ms(calls[op]), kernel_time_ms(compiled)
    assert compiled_ms <= 1.15 * eager_ms, f"{op}: {compiled_ms:.4f} ms launched by Inductor vs {eager_ms:.4f} ms eager"
