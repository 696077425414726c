"""ln_modulate and gated_residual_ln_modulate against their PyTorch references (three-way rule), on the
device the suite runs on (the Triton interpreter on a CPU).

Outputs are "poisoned before the call": `check_against_reference` fills blocks of each output's size with
NaN and frees them right before the op runs, so on CUDA the caching allocator hands those NaN blocks to
the op's torch.empty; on the CPU reuse is up to the allocator. Either way every output element must be
finite and within the bound, so an element the kernel forgot to write fails the test.
"""
import importlib
import itertools

import pytest
import torch

from dit_fast.kernels import gated_residual_ln_modulate, gated_residual_ln_modulate_ref, ln_modulate, ln_modulate_ref
from tests.determinism import assert_backward_deterministic
from tests.tolerance import assert_three_way

ln = importlib.import_module("dit_fast.kernels.ln_modulate")  # the module (the package exports the function)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _poison_like(tensors) -> None:
    """Hand NaN-filled blocks of each tensor's size back to the allocator, for the next torch.empty calls."""
    blocks = [torch.full_like(t, float("nan")) for t in tensors]
    del blocks


def check_against_reference(op, ref, inputs: dict, output_names: tuple) -> None:
    """Three-way check of op(**inputs) and of the gradient of every tensor input against ref.

    inputs: name -> tensor in the op's dtype, passed to the op with its strides as given (detached leaves);
    ref gets copies in float64 (the accurate reference) and in the op's dtype (PyTorch's own error).
    Non-tensor inputs (eps) are passed unchanged.
    """
    tensor_names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]

    def leaves(convert):
        return {n: convert(v.detach()).requires_grad_() if n in tensor_names else v for n, v in inputs.items()}

    op_inputs = leaves(lambda t: t)  # detach keeps the strides, so views stay non-contiguous
    ref64_inputs = leaves(lambda t: t.double())
    same_inputs = leaves(lambda t: t.clone())

    ref64_out = _as_tuple(ref(**ref64_inputs))
    same_out = _as_tuple(ref(**same_inputs))
    _poison_like(same_out)
    out = _as_tuple(op(**op_inputs))
    for name, o, r64, same in zip(output_names, out, ref64_out, same_out):
        assert o.dtype == same.dtype, f"{name}: dtype {o.dtype}, expected {same.dtype}"
        assert_three_way(o, r64, same, name)

    cotangents = [torch.randn_like(o) for o in out]  # (B, T, D) each, fresh random
    ref64_leaves = [ref64_inputs[n] for n in tensor_names]
    ref64_grads = torch.autograd.grad(ref64_out, ref64_leaves, [c.double() for c in cotangents])
    same_grads = torch.autograd.grad(same_out, [same_inputs[n] for n in tensor_names], cotangents)
    _poison_like(same_grads)
    grads = torch.autograd.grad(out, [op_inputs[n] for n in tensor_names], cotangents)
    for name, g, r64, same in zip(tensor_names, grads, ref64_grads, same_grads):
        assert_three_way(g, r64, same, f"d{name}")


def make_inputs(B: int, T: int, D: int, dtype: torch.dtype, device, residual: bool) -> dict:
    """Random inputs; shift/scale/gate are the strided (B, D) views that chunk(6, dim=1) gives, as in DiT."""
    x = torch.randn(B, T, D, dtype=dtype, device=device)
    shift, scale, gate, *_ = torch.randn(B, 6 * D, dtype=dtype, device=device).chunk(6, dim=1)  # (B, D) each
    assert shift.stride() == (6 * D, 1)
    if not residual:
        return {"x": x, "shift": shift, "scale": scale}
    y = torch.randn(B, T, D, dtype=dtype, device=device)
    return {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale}


def check_variant(B, T, D, dtype, device, residual) -> None:
    inputs = make_inputs(B, T, D, dtype, device, residual)
    if residual:
        check_against_reference(gated_residual_ln_modulate, gated_residual_ln_modulate_ref, inputs, ("x_new", "h"))
    else:
        check_against_reference(ln_modulate, ln_modulate_ref, inputs, ("h",))


# A handful of representative shapes, cheap enough for the interpreter: batch 1 and > 1, T = 1 / odd / 256
# (several backward chunks per sample), D not a power of two (72, 1000, 1152) and 384, every dtype. The full
# sweep (B x T x D x dtype) runs with `-m full`.
DEFAULT_CASES = [
    (3, 7, 72, "fp32"),
    (3, 1, 1000, "bf16"),
    (1, 7, 384, "fp16"),
    (3, 7, 1152, "bf16"),
    (3, 256, 72, "bf16"),
]


@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
@pytest.mark.parametrize("B,T,D,dtype", DEFAULT_CASES, ids=[f"B{b}-T{t}-D{d}-{dt}" for b, t, d, dt in DEFAULT_CASES])
def test_forward_and_gradients(B, T, D, dtype, residual, device):
    check_variant(B, T, D, DTYPES[dtype], device, residual)


FULL_CASES = list(itertools.product([1, 3], [1, 7, 256], [72, 384, 1000, 1152], list(DTYPES)))


@pytest.mark.full
@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
@pytest.mark.parametrize("B,T,D,dtype", FULL_CASES, ids=[f"B{b}-T{t}-D{d}-{dt}" for b, t, d, dt in FULL_CASES])
def test_forward_and_gradients_full(B, T, D, dtype, residual, device):
    check_variant(B, T, D, DTYPES[dtype], device, residual)


def test_each_sample_uses_its_own_modulation(device):
    """Samples get very different shift/scale/gate, so reading another sample's row (e.g. by program id) fails."""
    B, T, D = 4, 5, 72
    inputs = make_inputs(B, T, D, torch.float32, device, residual=True)
    offsets = 10.0 * torch.arange(B, dtype=torch.float32, device=device)[:, None]  # (B, 1)
    inputs["shift"].sub_(10 * offsets)  # in place: the strided chunk views stay strided
    inputs["scale"].add_(offsets)
    inputs["gate"].sub_(offsets)
    check_against_reference(gated_residual_ln_modulate, gated_residual_ln_modulate_ref, inputs, ("x_new", "h"))
    plain = {name: inputs[name] for name in ("x", "shift", "scale")}
    check_against_reference(ln_modulate, ln_modulate_ref, plain, ("h",))


@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
def test_strided_x_and_y(residual, device):
    """x, y as a slice of wider rows (a strided view) and as a transpose (last dim not contiguous)."""
    B, T, D = 2, 6, 40
    inputs = make_inputs(B, T, D, torch.float32, device, residual)
    inputs["x"] = torch.randn(B, T, 2 * D, device=device)[..., :D]  # row stride 2*D
    if residual:
        inputs["y"] = torch.randn(B, D, T, device=device).transpose(1, 2)  # column stride T
    else:
        inputs["x"] = torch.randn(B, D, T, device=device).transpose(1, 2)
    op, ref, names = (
        (gated_residual_ln_modulate, gated_residual_ln_modulate_ref, ("x_new", "h"))
        if residual
        else (ln_modulate, ln_modulate_ref, ("h",))
    )
    check_against_reference(op, ref, inputs, names)


@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
def test_gradcheck_float64(residual, device):
    """torch.autograd.gradcheck in float64 (the kernels compute in fp64 for fp64 inputs) on a small shape."""
    inputs = make_inputs(2, 3, 6, torch.float64, device, residual)
    leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
    op = gated_residual_ln_modulate if residual else ln_modulate
    assert torch.autograd.gradcheck(lambda *args: op(*args, eps=1e-6), leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
def test_backward_is_deterministic(residual, device):
    """Two backward passes on the same inputs give bit-identical gradients (no atomics)."""
    op = gated_residual_ln_modulate if residual else ln_modulate
    assert_backward_deterministic(op, make_inputs(2, 64, 384, torch.bfloat16, device, residual))


def test_width_past_the_block_cap_is_rejected(device):
    x = torch.randn(1, 2, 8193, device=device)
    shift, scale = torch.randn(2, 1, 8193, device=device)
    with pytest.raises(ValueError, match="D <= 8192.*D=8193"):
        ln_modulate(x, shift, scale)
    with pytest.raises(ValueError, match="D <= 8192.*D=8193"):
        gated_residual_ln_modulate(x, x, shift, shift, scale)


def test_bad_inputs_are_rejected(device):
    x = torch.randn(2, 3, 8, device=device)
    good = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\).*got \(3, 8\)"):
        ln_modulate(x, torch.randn(3, 8, device=device), good)
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\); got shape \(6, 8\)"):
        ln_modulate(x.reshape(6, 8), good, good)
    with pytest.raises(TypeError, match="scale has dtype torch.float16; expected x's dtype torch.float32"):
        ln_modulate(x, good, good.half())
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        ln_modulate(x.long(), good.long(), good.long())
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3, 8\).*got \(2, 4, 8\)"):
        gated_residual_ln_modulate(x, torch.randn(2, 4, 8, device=device), good, good, good)
    with pytest.raises(TypeError, match="gate has dtype torch.bfloat16"):
        gated_residual_ln_modulate(x, x, good.bfloat16(), good, good)


@pytest.mark.parametrize("residual", [False, True], ids=["ln_modulate", "gated_residual_ln_modulate"])
@pytest.mark.parametrize("T", [7, 8], ids=["tiles-cross-samples", "tiles-in-one-sample"])
@pytest.mark.parametrize("rows,rows_per_chunk", [(1, 2), (2, 4), (4, 4)])
def test_every_launch_config_matches_the_reference(rows, rows_per_chunk, T, residual, device):
    """Explicit launch configs (bench/kernel_sweep.py's overrides): tiles of 1-4 rows that divide T (per-sample
    vectors loaded once per tile) or cross sample boundaries (gathered per row), forward and backward, fp32."""
    B, D = 3, 40
    inputs = make_inputs(B, T, D, torch.float32, device, residual)
    x, shift, scale = inputs["x"], inputs["shift"], inputs["scale"]
    y, gate = inputs.get("y"), inputs.get("gate")
    config = ln.LaunchConfig(rows, 1, rows_per_chunk)
    x_new, h, mean, rstd = ln._forward(x, y, gate, shift, scale, 1e-6, config)
    grad_h, grad_x_new = torch.randn_like(x), torch.randn_like(x)
    saved = x_new if residual else x
    grads = ln._backward(grad_h, grad_x_new if residual else None, saved, y, gate, scale, mean, rstd, config)

    leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    if residual:
        ref_x_new, ref_h = gated_residual_ln_modulate_ref(**leaves)
        ref_grads = torch.autograd.grad((ref_x_new, ref_h), [leaves[n] for n in ("x", "y", "gate", "shift", "scale")],
                                        (grad_x_new.double(), grad_h.double()))  # fmt: skip
        torch.testing.assert_close(x_new, ref_x_new.float(), rtol=1e-5, atol=1e-5)
    else:
        ref_h = ln_modulate_ref(**leaves)
        ref_grads = torch.autograd.grad(ref_h, [leaves[n] for n in ("x", "shift", "scale")], grad_h.double())
        grads = (grads[0], grads[3], grads[4])  # dx, dshift, dscale
    torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-5)
    for name, grad, ref_grad in zip(("dx", "dy", "dgate", "dshift", "dscale") if residual else ("dx", "dshift", "dscale"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
