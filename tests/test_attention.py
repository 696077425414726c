"""CPU tests of dit_fast.attention: the math reference, the CPU backends, availability, errors, tracing."""
import importlib
import logging
import sys
import types

import pytest
import torch

import dit_fast.attention as attention_module
from dit_fast.attention import (
    BACKEND_NAMES,
    attention,
    attention_flops,
    available_backends,
    resolve_backend,
    unavailable_backends,
)
from tests.tolerance import assert_three_way

CPU_BACKENDS = ("math", "sdpa")
OPTIONAL_PACKAGES = {"flash2": "flash_attn", "flash3": "flash_attn_interface", "xformers": "xformers"}


def float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Independent reference: softmax(q k^T / sqrt(Dh)) v in float64, (B, T, H, Dh) in and out."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5  # (B, H, Tq, Tk)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)  # (B, Tq, H, Dh)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same formula run entirely in the inputs' dtype: PyTorch's own same-dtype error for the rule."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5  # (B, H, Tq, Tk)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)  # (B, Tq, H, Dh)


def packed_qkv(batch=3, seq_len=37, heads=4, head_dim=72, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, 3, heads, head_dim, generator=generator).to(dtype)  # (B, T, 3, H, Dh)


def output_and_grad(fn, qkv: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(q, k, v) on the strided views qkv.unbind(2), and the gradient of <out, grad_out> w.r.t. qkv."""
    qkv = qkv.detach().requires_grad_(True)
    out = fn(*qkv.unbind(2))  # (B, T, H, Dh)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)  # (B, T, 3, H, Dh)
    return out, dqkv


@pytest.fixture
def reload_attention_afterwards():
    """Reload dit_fast.attention after the test (and after monkeypatch has restored sys.modules)."""
    yield attention_module
    importlib.reload(attention_module)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_float64_reference(backend, dtype):
    qkv = packed_qkv(dtype=dtype)
    q, k, v = qkv.unbind(2)  # each (B, T, H, Dh), strided
    assert not q.is_contiguous()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)  # (B, T, H, Dh)

    out, dqkv = output_and_grad(lambda *t: attention(*t, backend=backend), qkv, grad_out)
    ref_out, ref_dqkv = output_and_grad(float64_attention, qkv.double(), grad_out.double())
    plain_out, plain_dqkv = output_and_grad(plain_attention, qkv, grad_out)

    assert_three_way(out, ref_out, plain_out, f"{backend} output")
    assert_three_way(dqkv, ref_dqkv, plain_dqkv, f"{backend} dqkv")


def test_math_is_exact_in_float64():
    qkv = packed_qkv(dtype=torch.float64, seed=2)
    out = attention(*qkv.unbind(2), backend="math")
    torch.testing.assert_close(out, float64_attention(*qkv.unbind(2)), rtol=1e-12, atol=1e-12)


def test_math_gradcheck_in_float64():
    qkv = packed_qkv(batch=2, seq_len=3, heads=2, head_dim=4, dtype=torch.float64, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: attention(*x.unbind(2), backend="math"), (qkv,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_with_a_shorter_key_sequence(backend):
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 19, 3, 72, generator=generator)  # (B, Tq, H, Dh)
    kv = torch.randn(2, 5, 2, 3, 72, generator=generator)  # (B, Tk, 2, H, Dh)
    k, v = kv.unbind(2)
    out = attention(q, k, v, backend=backend)  # (B, Tq, H, Dh)
    assert_three_way(out, float64_attention(q, k, v), plain_attention(q, k, v), f"{backend} cross-attention")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_reshapes_to_tokens_without_a_copy(backend):
    batch, seq_len, heads, head_dim = 3, 37, 4, 72
    out = attention(*packed_qkv(batch, seq_len, heads, head_dim).unbind(2), backend=backend)
    assert out.shape == (batch, seq_len, heads, head_dim)
    assert out.is_contiguous(), f"{backend} output strides {out.stride()}"
    assert out.reshape(batch, seq_len, heads * head_dim).data_ptr() == out.data_ptr()


def test_cpu_availability():
    assert available_backends("cpu", torch.float32, 72) == ["sdpa", "math"]
    problems = unavailable_backends("cpu", torch.float32, 72)
    assert set(problems) == set(BACKEND_NAMES) - {"sdpa", "math"}
    assert "CUDA" in problems["sdpa-cudnn"]


def test_unknown_backend_lists_every_name():
    qkv = packed_qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash4'") as error:
        attention(*qkv.unbind(2), backend="flash4")
    for name in ("auto",) + BACKEND_NAMES:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash4", "cpu", torch.float32, 72, 37)


@pytest.mark.parametrize("backend", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flash3", "flash2", "xformers"])
def test_unavailable_backend_names_the_reason_and_the_available_ones(backend):
    qkv = packed_qkv()
    with pytest.raises(ValueError, match=f"attention backend '{backend}' is not available here") as error:
        attention(*qkv.unbind(2), backend=backend)
    message = str(error.value)
    assert message.endswith("sdpa, math"), message
    assert unavailable_backends("cpu", torch.float32, 72)[backend] in message


def test_dtype_and_head_dim_limits_are_reported():
    problems = unavailable_backends("cpu", torch.float32, 72)
    assert "needs a CUDA device" in problems["sdpa-flash"]
    backend = attention_module.BACKENDS["sdpa-cudnn"]
    assert "dtype" in attention_module._input_problem(backend, "cuda", torch.float32, 64)
    assert "multiple of 8" in attention_module._input_problem(backend, "cuda", torch.bfloat16, 68)
    assert "at most 128" in attention_module._input_problem(backend, "cuda", torch.bfloat16, 136)
    assert attention_module._input_problem(backend, "cuda", torch.bfloat16, 72) is None


class BrokenModule(types.ModuleType):
    """A package that imports but blows up on first use, like a wheel built against another torch."""

    def __getattr__(self, name):
        raise RuntimeError(f"undefined symbol while loading {self.__name__}.{name}")


@pytest.mark.parametrize("breakage", ["raises on attribute access", "import blocked"])
@pytest.mark.parametrize("backend", sorted(OPTIONAL_PACKAGES))
def test_broken_optional_package_is_reported_not_raised(
    backend, breakage, reload_attention_afterwards, monkeypatch
):
    package = OPTIONAL_PACKAGES[backend]
    broken = BrokenModule(package) if breakage == "raises on attribute access" else None
    monkeypatch.setitem(sys.modules, package, broken)
    monkeypatch.delitem(sys.modules, f"{package}.ops", raising=False)
    module = importlib.reload(attention_module)  # importing never touches the optional packages

    problems = module.unavailable_backends("cpu", torch.float16, 64)
    assert package in problems[backend]
    assert ("failed to import" if broken is not None else "not installed") in problems[backend]
    assert backend not in module.available_backends("cpu", torch.float16, 64)
    with pytest.raises(ValueError, match=f"'{backend}' is not available here .*{package}"):
        module.resolve_backend(backend, "cpu", torch.float16, 64, 256)
    qkv = packed_qkv()
    assert module.attention(*qkv.unbind(2), backend="math").shape == (3, 37, 4, 72)


def test_installed_package_still_needs_cuda(monkeypatch):
    fake_flash = types.ModuleType("flash_attn")
    fake_flash.flash_attn_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash)
    monkeypatch.setattr(attention_module, "_PACKAGE_PROBES", {})
    assert "needs a CUDA device" in unavailable_backends("cpu", torch.bfloat16, 64)["flash2"]


def test_auto_on_cpu_picks_a_working_backend_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "_AUTO_CHOICES", {})
    caplog.set_level(logging.INFO, logger="dit_fast.attention")
    choice = resolve_backend("auto", "cpu", torch.float32, 72, 37)
    assert choice in available_backends("cpu", torch.float32, 72)
    assert resolve_backend("auto", "cpu", torch.float32, 72, 40) == choice  # same seq-len bucket: cached

    qkv = packed_qkv()
    out = attention(*qkv.unbind(2), backend="auto")  # no grad needed: a second key, a second log line
    assert_three_way(out, float64_attention(*qkv.unbind(2)), plain_attention(*qkv.unbind(2)), "auto output")
    records = [r for r in caplog.records if r.name == "dit_fast.attention"]
    assert len(records) == 2, [r.getMessage() for r in records]
    assert choice in records[0].getMessage()


def test_resolve_backend_returns_named_backends_unchanged():
    assert resolve_backend("math", torch.device("cpu"), torch.float32, 72, 256) == "math"


def test_auto_refuses_the_meta_device():
    with pytest.raises(ValueError, match="not meta"):
        resolve_backend("auto", "meta", torch.bfloat16, 72, 256)


def test_shape_mismatch_is_rejected():
    q = torch.randn(2, 16, 4, 72)  # (B, T, H, Dh)
    with pytest.raises(ValueError, match="attention expects q"):
        attention(q, q[..., :64], q, backend="math")


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_compiles_without_graph_break(backend, monkeypatch):
    monkeypatch.setattr(attention_module, "_AUTO_CHOICES", {})  # "auto" must fall back inside the trace
    torch._dynamo.reset()
    batch, seq_len, heads, head_dim = 2, 37, 3, 72

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")  # any graph break raises
    qkv = packed_qkv(batch, seq_len, heads, head_dim)
    grad_out = torch.randn(batch, seq_len, heads, head_dim)  # (B, T, H, Dh)
    out, dqkv = output_and_grad(lambda *t: compiled(*t, backend=backend), qkv, grad_out)
    assert attention_module._AUTO_CHOICES == {}  # nothing was benchmarked or cached inside the trace
    ref_out, ref_dqkv = output_and_grad(lambda *t: attention(*t, backend=backend), qkv, grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dqkv, ref_dqkv)


def test_forced_sdpa_kernel_traces_without_graph_break():
    """The sdpa_kernel context manager of the sdpa-* backends traces; the CPU has SDPA's flash kernel."""
    torch._dynamo.reset()
    run_flash = attention_module.BACKENDS["sdpa-flash"].run
    compiled = torch.compile(lambda qkv: run_flash(*qkv.unbind(2)), fullgraph=True, backend="aot_eager")
    qkv = packed_qkv()
    assert_three_way(compiled(qkv), float64_attention(*qkv.unbind(2)), plain_attention(*qkv.unbind(2)), "sdpa-flash")


def test_attention_flops():
    assert attention_flops(1, 1, 1, 1) == 4
    assert attention_flops(1, 1, 1, 1, backward=True) == 14
    batch, seq_len, heads, head_dim = 8, 256, 16, 72  # DiT-XL/2 at 256px
    forward = 4 * batch * heads * seq_len**2 * head_dim
    assert attention_flops(batch, seq_len, heads, head_dim) == forward
    assert attention_flops(batch, seq_len, heads, head_dim, backward=True) == 3.5 * forward
