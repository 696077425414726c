"""GPU tests of dit_fast.attention: every available backend against the fp32 math reference, auto, compile."""
import logging
import sys
import types

import pytest
import torch

import dit_fast.attention as attention_module
from dit_fast.attention import BACKEND_NAMES, attention, available_backends, resolve_backend, unavailable_backends
from tests.tolerance import assert_three_way

pytestmark = pytest.mark.gpu

DTYPE = torch.bfloat16
SHAPES = {"DiT-XL/2 256px": (8, 256, 16, 72), "DiT-XL/2 512px": (8, 1024, 16, 72)}  # (B, T, H, Dh)
TRACEABLE_BACKENDS = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa", "math")


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
    """The fp32 reference must not silently run its matmuls in TF32."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


def packed_qkv(batch, seq_len, heads, head_dim, seed=0) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, seq_len, 3, heads, head_dim)
    return torch.randn(shape, device="cuda", dtype=DTYPE, generator=generator)  # (B, T, 3, H, Dh)


def output_and_grad(backend: str, qkv: torch.Tensor, grad_out: torch.Tensor, fn=attention) -> tuple:
    """fn(*qkv.unbind(2), backend=backend) on the strided views, and the gradient w.r.t. the packed qkv."""
    qkv = qkv.detach().requires_grad_(True)
    out = fn(*qkv.unbind(2), backend=backend)  # (B, T, H, Dh)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)  # (B, T, 3, H, Dh)
    return out, dqkv


def skip_unless_available(backend: str, head_dim: int) -> None:
    problems = unavailable_backends("cuda", DTYPE, head_dim)
    if backend in problems:
        pytest.skip(f"{backend} not available here: {problems[backend]}")


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backend_matches_fp32_reference(backend, shape_name):
    batch, seq_len, heads, head_dim = SHAPES[shape_name]
    skip_unless_available(backend, head_dim)
    qkv = packed_qkv(batch, seq_len, heads, head_dim)
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=DTYPE)  # (B, T, H, Dh)

    out, dqkv = output_and_grad(backend, qkv, grad_out)
    ref_out, ref_dqkv = output_and_grad("math", qkv.float(), grad_out.float())
    plain_out, plain_dqkv = output_and_grad("math", qkv, grad_out)

    assert_three_way(out, ref_out, plain_out, f"{backend} output, {shape_name}")
    assert_three_way(dqkv, ref_dqkv, plain_dqkv, f"{backend} dqkv, {shape_name}")
    assert out.is_contiguous(), f"{backend} output strides {out.stride()}: reshape(B, T, H * Dh) would copy"


def test_auto_picks_a_working_backend_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "_AUTO_CHOICES", {})
    caplog.set_level(logging.INFO, logger="dit_fast.attention")
    batch, seq_len, heads, head_dim = SHAPES["DiT-XL/2 256px"]
    choice = resolve_backend("auto", "cuda", DTYPE, head_dim, seq_len)
    assert choice in available_backends("cuda", DTYPE, head_dim)
    assert resolve_backend("auto", "cuda", DTYPE, head_dim, seq_len) == choice

    qkv = packed_qkv(batch, seq_len, heads, head_dim, seed=1)
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=DTYPE)  # (B, T, H, Dh)
    out, dqkv = output_and_grad("auto", qkv, grad_out)  # needs grad, like resolve_backend's default: cached
    ref_out, ref_dqkv = output_and_grad("math", qkv.float(), grad_out.float())
    plain_out, plain_dqkv = output_and_grad("math", qkv, grad_out)
    assert_three_way(out, ref_out, plain_out, f"auto ({choice}) output")
    assert_three_way(dqkv, ref_dqkv, plain_dqkv, f"auto ({choice}) dqkv")

    records = [r for r in caplog.records if r.name == "dit_fast.attention"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert choice in records[0].getMessage()


@pytest.mark.parametrize("backend", TRACEABLE_BACKENDS + ("auto",))
def test_compiles_fullgraph(backend):
    batch, seq_len, heads, head_dim = SHAPES["DiT-XL/2 256px"]
    if backend != "auto":
        skip_unless_available(backend, head_dim)
    resolve_backend(backend, "cuda", DTYPE, head_dim, seq_len)  # "auto": benchmark eagerly, before tracing
    torch._dynamo.reset()

    compiled = torch.compile(attention, fullgraph=True)  # fullgraph: any graph break raises
    qkv = packed_qkv(batch, seq_len, heads, head_dim, seed=2)
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=DTYPE)  # (B, T, H, Dh)
    out, dqkv = output_and_grad(backend, qkv, grad_out, fn=compiled)
    ref_out, ref_dqkv = output_and_grad("math", qkv.float(), grad_out.float())
    eager_out, eager_dqkv = output_and_grad(backend, qkv, grad_out)
    assert_three_way(out, ref_out, eager_out, f"compiled {backend} output")
    assert_three_way(dqkv, ref_dqkv, eager_dqkv, f"compiled {backend} dqkv")


class BrokenModule(types.ModuleType):
    """A package that imports but blows up on first use, like a wheel built against another torch."""

    def __getattr__(self, name):
        raise RuntimeError(f"undefined symbol while loading {self.__name__}.{name}")


def _ops_without_kernels(*args, **kwargs):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")


@pytest.mark.parametrize("breakage", ["ops fail on CUDA", "raises on attribute access"])
def test_broken_xformers_is_reported_unavailable(breakage, monkeypatch):
    if breakage == "ops fail on CUDA":
        package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
        package.__path__ = []
        package.ops, ops.memory_efficient_attention = ops, _ops_without_kernels
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    else:
        package = BrokenModule("xformers")
        monkeypatch.delitem(sys.modules, "xformers.ops", raising=False)
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setattr(attention_module, "_PACKAGE_PROBES", {})
    monkeypatch.setattr(attention_module, "_XFORMERS_CUDA_PROBLEMS", {})

    assert "xformers" not in available_backends("cuda", DTYPE, 72)
    problem = unavailable_backends("cuda", DTYPE, 72)["xformers"]
    assert ("CUDA ops do not work" if breakage == "ops fail on CUDA" else "failed to import") in problem
    with pytest.raises(ValueError, match="'xformers' is not available here"):
        resolve_backend("xformers", "cuda", DTYPE, 72, 256)


def test_installed_xformers_never_crashes_availability():
    """Whatever xformers is (or is not) installed on this machine, asking about it only reports."""
    problems = unavailable_backends("cuda", DTYPE, 72)
    assert "xformers" in problems or "xformers" in available_backends("cuda", DTYPE, 72)
