"""Attention behind one call, `attention(q, k, v, backend)`, over a registry of backends.

q, k, v are (B, T, H, Dh) tensors, typically the strided views `qkv.unbind(2)` of a
(B, T, 3, H, Dh) projection; the result is (B, T, H, Dh), contiguous in that order, so
`.reshape(B, T, H * Dh)` is free (the fused kernels write that layout directly; math pays one copy).
Softmax scale 1/sqrt(Dh); non-causal, no mask, no dropout. The key/value sequence length may differ
from the query's (cross-attention).

Backends (in the default preference order):
  flash3          flash-attention 3, package `flash_attn_interface` (Hopper only)
  sdpa-cudnn      torch SDPA with the cuDNN kernel forced
  sdpa-flash      torch SDPA with its flash-attention-2 kernel forced
  flash2          flash-attention 2, package `flash_attn`
  sdpa-efficient  torch SDPA with the memory-efficient (xformers-derived) kernel forced
  xformers        `xformers.ops.memory_efficient_attention`, if its CUDA ops really load
  sdpa            torch SDPA with PyTorch's own kernel choice; works on any device (the CPU default)
  math            the plain reference, what the reference model uses; any device and dtype

Optional packages are imported lazily, the first time a backend's availability is asked, inside
try/except, so a missing or broken package never breaks `import dit_fast.attention`.

"auto" is resolved by `resolve_backend` outside any compiled region: on CUDA a one-time
micro-benchmark (fwd, or fwd+bwd when training) of every available fused backend, each first checked
against the math reference, picks the fastest per (GPU, dtype, head dim, sequence-length bucket,
grad); on the CPU it is "sdpa". The choice is cached in-process and logged once. Inside a
torch.compile trace "auto" takes the cached choice, else the first of sdpa-cudnn > sdpa-flash >
sdpa-efficient > sdpa > math that suits the device type, dtype and head dim.
"""
import importlib
import logging
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger("dit_fast.attention")

AUTO = "auto"
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The backends themselves: (B, T, H, Dh) in, (B, T, H, Dh) out.
# ----------------------------------------------------------------------------------------------


def _softmax_scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v: both matmuls in the input dtype, the softmax in at least fp32.

    For fp16/bf16 this is what the reference DiT computes under autocast (autocast runs softmax in
    fp32, the matmuls in half precision); fp32 and fp64 inputs stay in their own precision throughout.
    The output costs one copy to reach the (B, T, H, Dh) layout.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
    scores = (q * _softmax_scale(q)) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    probs = scores.softmax(dim=-1, dtype=softmax_dtype).to(q.dtype)  # (B, H, Tq, Tk)
    return (probs @ v).transpose(1, 2).contiguous()  # (B, Tq, H, Dh)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch SDPA on (B, H, T, Dh) transposed views (no copies).

    The fused kernels write their output in (B, T, H, Dh) order, so the final `.contiguous()` is a
    no-op for them; only SDPA's internal math fallback (e.g. fp64 on CUDA) pays a copy there.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=_softmax_scale(q)
    )  # (B, H, Tq, Dh)
    return out.transpose(1, 2).contiguous()  # (B, Tq, H, Dh)


def _sdpa_forced(kernel: SDPBackend) -> AttentionFn:
    """torch SDPA restricted to one kernel; `sdpa_kernel` is traced by dynamo (torch >= 2.5)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return _sdpa(q, k, v)  # (B, Tq, H, Dh)

    return run


def _flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = _package_function("flash3")(q, k, v, softmax_scale=_softmax_scale(q), causal=False)
    return out[0] if isinstance(out, tuple) else out  # (B, Tq, H, Dh); some FA3 releases also return the LSE


def _flash2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _package_function("flash2")(q, k, v, dropout_p=0.0, softmax_scale=_softmax_scale(q), causal=False)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _package_function("xformers")(q, k, v, scale=_softmax_scale(q))  # (B, Tq, H, Dh)


# ----------------------------------------------------------------------------------------------
# Registry: what each backend needs.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation and the inputs it supports."""

    name: str
    run: AttentionFn
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    min_capability: tuple[int, int] | None = None
    max_capability: tuple[int, int] | None = None
    package: str | None = None  # import name of the optional package it lives in


_HALF_ON_GPU = dict(devices=("cuda",), dtypes=HALF_DTYPES, head_dim_multiple=8)
_ANY_FLOAT_ON_GPU = dict(devices=("cuda",), dtypes=HALF_DTYPES + (torch.float32,), head_dim_multiple=8)
_ANYWHERE = dict(devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)

BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend
    for backend in (
        AttentionBackend(
            "flash3", _flash3, **_HALF_ON_GPU, max_head_dim=256, min_capability=(9, 0), max_capability=(9, 0),
            package="flash_attn_interface",
        ),
        # cuDNN 9.19 (the torch 2.11 wheels' cuDNN) takes head dims up to 128; 256 needs cuDNN > 9.22.
        AttentionBackend(
            "sdpa-cudnn", _sdpa_forced(SDPBackend.CUDNN_ATTENTION), **_HALF_ON_GPU, max_head_dim=128,
            min_capability=(8, 0),
        ),
        AttentionBackend(
            "sdpa-flash", _sdpa_forced(SDPBackend.FLASH_ATTENTION), **_HALF_ON_GPU, max_head_dim=256,
            min_capability=(8, 0),
        ),
        AttentionBackend(
            "flash2", _flash2, **_HALF_ON_GPU, max_head_dim=256, min_capability=(8, 0), package="flash_attn"
        ),
        AttentionBackend("sdpa-efficient", _sdpa_forced(SDPBackend.EFFICIENT_ATTENTION), **_ANY_FLOAT_ON_GPU),
        AttentionBackend("xformers", _xformers, **_ANY_FLOAT_ON_GPU, package="xformers"),
        AttentionBackend("sdpa", _sdpa, **_ANYWHERE),
        AttentionBackend("math", math_attention, **_ANYWHERE),
    )
}
BACKEND_NAMES = tuple(BACKENDS)
_COMPILE_FALLBACK_ORDER = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa", "math")
_PACKAGE_FUNCTIONS = {
    "flash_attn_interface": "flash_attn_func",
    "flash_attn": "flash_attn_func",
    "xformers": "memory_efficient_attention",  # imported from xformers.ops
}


# ----------------------------------------------------------------------------------------------
# Availability: lazy, cached package probes, then device / dtype / head dim / GPU checks.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PackageProbe:
    function: Callable | None
    problem: str | None


_PACKAGE_PROBES: dict[str, _PackageProbe] = {}  # private cache: import name -> probe result
_XFORMERS_CUDA_PROBLEMS: dict[torch.device, str | None] = {}  # private cache: device -> why its ops fail


def _probe_package(package: str) -> _PackageProbe:
    """Import an optional package once; any failure (missing, broken build, ABI mismatch) becomes a reason."""
    if package not in _PACKAGE_PROBES:
        module_name = "xformers.ops" if package == "xformers" else package
        try:
            function = getattr(importlib.import_module(module_name), _PACKAGE_FUNCTIONS[package])
            _PACKAGE_PROBES[package] = _PackageProbe(function, None)
        except ModuleNotFoundError as error:
            missing = error.name in (package, module_name)
            problem = f"{package} not installed" if missing else f"{package} failed to import: {error!r}"
            _PACKAGE_PROBES[package] = _PackageProbe(None, problem)
        except Exception as error:  # a broken optional package must not take the caller down
            _PACKAGE_PROBES[package] = _PackageProbe(None, f"{package} failed to import: {error!r}")
    return _PACKAGE_PROBES[package]


def _package_function(backend: str) -> Callable:
    probe = _probe_package(BACKENDS[backend].package)
    if probe.function is None:
        raise RuntimeError(f"attention backend {backend!r} is not available here ({probe.problem})")
    return probe.function


def _xformers_cuda_problem(device: torch.device) -> str | None:
    """Run one tiny xformers call on `device` once; its wheel may install while its CUDA ops cannot load."""
    if device not in _XFORMERS_CUDA_PROBLEMS:
        try:
            x = torch.ones(1, 8, 1, 64, device=device, dtype=torch.float16)  # (B, T, H, Dh)
            _package_function("xformers")(x, x, x)
            torch.cuda.synchronize(device)
            _XFORMERS_CUDA_PROBLEMS[device] = None
        except Exception as error:  # the probe exists to turn exactly these failures into "unavailable"
            _XFORMERS_CUDA_PROBLEMS[device] = f"xformers CUDA ops do not work: {error!r}"
    return _XFORMERS_CUDA_PROBLEMS[device]


def _input_problem(backend: AttentionBackend, device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `backend` cannot take this device type, dtype and head dim (None if it can); trace-safe."""
    if device_type not in backend.devices:
        return f"needs a {' or '.join(d.upper() for d in backend.devices)} device, got {device_type}"
    if dtype not in backend.dtypes:
        return f"needs dtype {' or '.join(str(d) for d in backend.dtypes)}, got {dtype}"
    if head_dim % backend.head_dim_multiple or (backend.max_head_dim is not None and head_dim > backend.max_head_dim):
        limit = f" and at most {backend.max_head_dim}" if backend.max_head_dim is not None else ""
        return f"needs a head dim that is a multiple of {backend.head_dim_multiple}{limit}, got {head_dim}"
    return None


def _gpu_problem(backend: AttentionBackend, device: torch.device) -> str | None:
    """Why this GPU or this torch build cannot run `backend` (None if it can)."""
    capability = torch.cuda.get_device_capability(device)
    if backend.min_capability is not None and capability < backend.min_capability:
        return f"needs compute capability >= {backend.min_capability}, got {capability}"
    if backend.max_capability is not None and capability > backend.max_capability:
        return f"needs compute capability <= {backend.max_capability}, got {capability}"
    if backend.name == "sdpa-flash" and not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    if backend.name == "sdpa-cudnn":
        if not torch.backends.cudnn.is_available():
            return "this torch build has no cuDNN"
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            return "cuDNN attention is not deterministic and torch.use_deterministic_algorithms(True) is set"
    if backend.name == "xformers":
        return _xformers_cuda_problem(device)
    return None


def _problem(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    backend = BACKENDS[name]
    if backend.package is not None:
        problem = _probe_package(backend.package).problem
        if problem is not None:
            return problem
    problem = _input_problem(backend, device.type, dtype, head_dim)
    if problem is None and device.type == "cuda":
        problem = _gpu_problem(backend, device)
    return problem


def unavailable_backends(device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """{backend: why it cannot run here} for every backend that cannot run on this device/dtype/head dim."""
    device = torch.device(device)
    problems = {name: _problem(name, device, dtype, head_dim) for name in BACKEND_NAMES}
    return {name: problem for name, problem in problems.items() if problem is not None}


def available_backends(device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Backends that can run on this device, dtype and head dim, in the default preference order."""
    device = torch.device(device)
    return [name for name in BACKEND_NAMES if _problem(name, device, dtype, head_dim) is None]


def _check_known(backend: str) -> None:
    if backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join((AUTO,) + BACKEND_NAMES)}")


def _require_available(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    problem = _problem(backend, device, dtype, head_dim)
    if problem is not None:
        available = ", ".join(available_backends(device, dtype, head_dim))
        raise ValueError(
            f"attention backend {backend!r} is not available here ({problem}); "
            f"available for {device.type} {dtype} head dim {head_dim}: {available}"
        )


# ----------------------------------------------------------------------------------------------
# "auto": one-time micro-benchmark per (GPU, dtype, head dim, sequence-length bucket, grad).
# ----------------------------------------------------------------------------------------------

_AUTO_CHOICES: dict[tuple, str] = {}  # private cache: _auto_key(...) -> backend name
_BENCH_TOKENS = 65536  # batch * seq_len of the timing inputs, about a DiT training step (XL/2: 256 x 256)
_BENCH_MAX_SCORES = 2**28  # and batch * seq_len^2 at most this, so long sequences stay quick
_BENCH_HEADS = 16  # heads of DiT-L and DiT-XL
_CHECK_MAX_SEQ_LEN = 4096  # the fp64 correctness check runs at min(seq_len, this)
_CHECK_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}  # the fused kernels' dtypes


def _seq_len_bucket(seq_len: int) -> int:
    """The power of two at or above `seq_len` (a loop, so that it also traces with symbolic sizes)."""
    bucket = 1
    while bucket < seq_len:
        bucket *= 2
    return bucket


def _auto_key(device: torch.device, dtype: torch.dtype, head_dim: int, seq_len: int, requires_grad: bool) -> tuple:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return device.type, device_name, dtype, head_dim, _seq_len_bucket(seq_len), requires_grad


def _max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _outputs(name: str, qkv: torch.Tensor, grad_out: torch.Tensor, requires_grad: bool) -> list[torch.Tensor]:
    """[out] or [out, dqkv] of backend `name` on the packed qkv (B, T, 3, H, Dh)."""
    qkv = qkv.detach().requires_grad_(requires_grad)
    out = BACKENDS[name].run(*qkv.unbind(2))  # (B, T, H, Dh)
    if not requires_grad:
        return [out]
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)  # (B, T, 3, H, Dh)
    return [out, dqkv]


def _passes_check(name: str, device, dtype, head_dim: int, seq_len: int, requires_grad: bool) -> bool:
    """Three-way rule against fp64 math: err(backend) <= 2 * err(math in `dtype`) + atol, outputs and grads."""
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG streams untouched
    seq_len = min(seq_len, _CHECK_MAX_SEQ_LEN)
    qkv = torch.randn(2, seq_len, 3, 2, head_dim, device=device, dtype=dtype, generator=generator)  # (B, T, 3, H, Dh)
    grad_out = torch.randn(2, seq_len, 2, head_dim, device=device, dtype=dtype, generator=generator)  # (B, T, H, Dh)
    reference = _outputs("math", qkv.double(), grad_out.double(), requires_grad)
    plain = _outputs("math", qkv, grad_out, requires_grad)
    tested = _outputs(name, qkv, grad_out, requires_grad)
    return all(
        _max_abs_err(got, ref) <= 2 * _max_abs_err(base, ref) + _CHECK_ATOL[dtype]
        for got, base, ref in zip(tested, plain, reference)
    )


def _time_ms(name: str, device, dtype, head_dim: int, seq_len: int, requires_grad: bool) -> float:
    """Median milliseconds of one fwd (or fwd+bwd) call on a representative batch, by CUDA events."""
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG streams untouched
    batch = max(1, min(_BENCH_TOKENS // seq_len, _BENCH_MAX_SCORES // seq_len**2))
    shape = (batch, seq_len, 3, _BENCH_HEADS, head_dim)
    qkv = torch.randn(shape, device=device, dtype=dtype, generator=generator)  # (B, T, 3, H, Dh)
    grad_out = torch.randn(shape[:2] + shape[3:], device=device, dtype=dtype, generator=generator)  # (B, T, H, Dh)
    for _ in range(2):  # warm-up: cuDNN builds its graph, kernels load
        _outputs(name, qkv, grad_out, requires_grad)
    iterations, samples = 3, []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            _outputs(name, qkv, grad_out, requires_grad)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iterations)
    return statistics.median(samples)


def _choose_by_benchmark(device, dtype, head_dim: int, seq_len: int, requires_grad: bool) -> tuple[str, str]:
    """(fastest fused backend that passes the check, or math; a one-line summary of what was measured)."""
    fused = [name for name in available_backends(device, dtype, head_dim) if name not in ("sdpa", "math")]
    timings, rejected = {}, {}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name in fused:
            try:
                if _passes_check(name, device, dtype, head_dim, seq_len, requires_grad):
                    timings[name] = _time_ms(name, device, dtype, head_dim, seq_len, requires_grad)
                else:
                    rejected[name] = "failed the check against math"
            except Exception as error:  # a kernel that refuses this shape is skipped, not fatal
                rejected[name] = repr(error)
    measured = [f"{name} {ms:.3f} ms" for name, ms in timings.items()]
    summary = ", ".join(measured + [f"{name}: {reason}" for name, reason in rejected.items()])
    return (min(timings, key=timings.get) if timings else "math"), summary or "no fused backend available"


def _choice_while_compiling(device, dtype, head_dim: int, seq_len: int, requires_grad: bool) -> str:
    """Inside a trace nothing can be timed: reuse a cached choice (any GPU name), else the fixed order."""
    wanted = (device.type, dtype, head_dim, _seq_len_bucket(seq_len), requires_grad)
    for (device_type, _name, *rest), choice in _AUTO_CHOICES.items():
        if (device_type, *rest) == wanted:
            return choice
    for name in _COMPILE_FALLBACK_ORDER:
        if _input_problem(BACKENDS[name], device.type, dtype, head_dim) is None:
            return name
    return "math"


def resolve_backend(
    backend: str, device, dtype: torch.dtype, head_dim: int, seq_len: int, requires_grad: bool = True
) -> str:
    """The concrete backend name that `backend` ("auto" or a name) means for these inputs.

    Call it eagerly (at model construction or on the first call) and pass the result to `attention`:
    "auto" on CUDA runs a one-time micro-benchmark (about a second). A named backend is checked and
    returned, or a ValueError lists the available ones.
    """
    _check_known(backend)
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _choice_while_compiling(device, dtype, head_dim, seq_len, requires_grad) if backend == AUTO else backend
    if backend != AUTO:
        _require_available(backend, device, dtype, head_dim)
        return backend
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"resolve 'auto' on the device attention will run on (cpu or cuda), not {device.type}")
    key = _auto_key(device, dtype, head_dim, seq_len, requires_grad)
    if key not in _AUTO_CHOICES:
        if device.type == "cuda":
            choice, summary = _choose_by_benchmark(device, dtype, head_dim, seq_len, requires_grad)
        else:
            choice, summary = "sdpa", "PyTorch picks its own CPU kernel"
        _AUTO_CHOICES[key] = choice
        _, device_name, _, _, bucket, _ = key
        timed = "fwd+bwd" if requires_grad else "fwd"
        logger.info(
            "attention backend for %s %s, head dim %d, seq len <= %d, %s: %s (%s)",
            device_name, dtype, head_dim, bucket, timed, choice, summary,
        )
    return _AUTO_CHOICES[key]


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = AUTO) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q (B, Tq, H, Dh) and k, v (B, Tk, H, Dh); returns (B, Tq, H, Dh).

    With a concrete backend name this traces under torch.compile(fullgraph=True) for the sdpa* and
    math backends; prefer resolving "auto" once with `resolve_backend` outside the compiled region.
    """
    _check_known(backend)
    if q.dim() != 4 or k.shape != v.shape or (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(
            f"attention expects q (B, Tq, H, Dh) and k, v (B, Tk, H, Dh); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if backend == AUTO:
        requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        backend = resolve_backend(AUTO, q.device, q.dtype, q.shape[-1], q.shape[1], requires_grad)
    elif not torch.compiler.is_compiling():
        _require_available(backend, q.device, q.dtype, q.shape[-1])
    return BACKENDS[backend].run(q, k, v)  # (B, Tq, H, Dh)


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int, backward: bool = False) -> int:
    """FLOPs of non-causal attention: 4*B*H*T^2*Dh for the forward; with backward=True the forward
    plus the backward (2.5x the forward), i.e. 3.5x the forward."""
    forward = 4 * batch * num_heads * seq_len * seq_len * head_dim
    return forward * 7 // 2 if backward else forward
