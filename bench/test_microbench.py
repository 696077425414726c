"""pytest-benchmark micro-benchmarks of the fused ops and the DiT-XL/2 block, with a regression check (CUDA only).

    pytest bench/ --benchmark-only --benchmark-autosave    # one run, saved as .benchmarks/<machine>/NNNN_<commit>*.json
    pytest-benchmark compare 0001 0002 --group-by=group --sort=name --columns=median,iqr,rounds   # two commits
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:5%  # fail on a slowdown
    pytest bench/ --benchmark-only --benchmark-json=PATH   # or save one run where you like
(run from the repository root: the saved runs live in ./.benchmarks, which git ignores)

Ops (bench.kernels.OP_CASES and their inputs) at the DiT-XL/2 training shape B=256, T=256, D=1152, bf16:
forward (recording autograd, as in training) and forward+backward, fast (Triton) and reference
(torch.compile'd, Inductor). The DiT-XL/2 adaLN-Zero block: forward without gradients (sampling) at batch
128 (one CFG step at batch 64), the fused block against the reference block, both compiled, bf16 weights,
the same attention backend. Timing: benchmark.pedantic of a function that runs the op and then
synchronises the device, so a round is the GPU work plus one launch-and-sync latency.

Regression check: test_fast_*_not_slower_* FAIL when the fast forward is slower than its reference by more
than NOISE_MARGIN, judged on GPU time (the profiler's summed kernel time, as bench/kernels.py reports). Every test skips
without CUDA; `pytest` from the repo root does not collect bench/ (pytest.ini: testpaths = tests).
"""

import functools
from collections.abc import Callable

import pytest
import torch

from bench.environment import kernel_time_ms
from bench.kernels import OP_CASES
from dit_fast.attention import AUTO, resolve_backend
from dit_fast.blocks import AdaLNZeroBlock
from dit_fast.fused_blocks import FusedAdaLNZeroBlock

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the micro-benchmarks time CUDA kernels and no CUDA GPU is visible"
    ),
]

BATCH, TOKENS = 256, 256  # DiT-XL/2 training batch at 256px
BLOCK_BATCH = 128  # forwards of one CFG sampling step at batch 64
WIDTH, HEADS, MLP_HIDDEN = 1152, 16, 4608  # DiT-XL/2
NOISE_MARGIN = 0.02  # run-to-run spread of GPU times; slower than this fails
KERNEL_CALLS = 20
ROUNDS, WARMUP_ROUNDS = 50, 5
CASES = {case.name: case for case in OP_CASES}
OPS = list(CASES)


def synchronised(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def benchmark_gpu(benchmark, fn: Callable[[], object]) -> None:
    benchmark.pedantic(synchronised(fn), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


@functools.cache
def op_inputs(op: str) -> dict:
    return CASES[op].make_inputs(BATCH, TOKENS)


@functools.cache
def op_function(op: str, impl: str) -> Callable:
    """The fused op, or its reference under torch.compile (compiled once per test session)."""
    return CASES[op].fused if impl == "fast" else torch.compile(CASES[op].reference, dynamic=False)


def op_forward(op: str, impl: str) -> Callable[[], object]:
    fn, inputs = op_function(op, impl), op_inputs(op)
    return lambda: fn(**inputs)


def op_forward_backward(op: str, impl: str) -> Callable[[], object]:
    fn, inputs = op_function(op, impl), op_inputs(op)
    leaves = list(inputs.values())
    outputs = fn(**inputs)
    cotangents = [torch.randn_like(o) for o in (outputs if isinstance(outputs, tuple) else (outputs,))]
    del outputs

    def run() -> None:
        outputs = fn(**inputs)
        torch.autograd.grad(outputs if isinstance(outputs, tuple) else (outputs,), leaves, cotangents)

    return run


@functools.cache
def compiled_blocks() -> dict[str, torch.nn.Module]:
    """The fused and the reference DiT-XL/2 block with the same bf16 weights and attention backend, compiled."""
    backend = resolve_backend(AUTO, "cuda", torch.bfloat16, WIDTH // HEADS, TOKENS, requires_grad=False)
    with torch.device("cuda"):
        fused = FusedAdaLNZeroBlock(WIDTH, HEADS, MLP_HIDDEN, backend)
        reference = AdaLNZeroBlock(WIDTH, HEADS, MLP_HIDDEN, backend)
    reference.load_state_dict(fused.state_dict())
    return {
        impl: torch.compile(block.to(torch.bfloat16).eval().requires_grad_(False), fullgraph=True, dynamic=False)
        for impl, block in (("fast", fused), ("reference", reference))
    }


@functools.cache
def block_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BLOCK_BATCH, TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16)  # (N, T, D)
    c = torch.randn(BLOCK_BATCH, WIDTH, device="cuda", dtype=torch.bfloat16)  # (N, D)
    return x, c


def block_forward(impl: str) -> Callable[[], object]:
    block, (x, c) = compiled_blocks()[impl], block_inputs()

    def run() -> None:
        with torch.no_grad():
            block(x, c)

    return run


def check_not_slower(benchmark, what: str, fast: Callable, reference: Callable) -> None:
    """Record the fast path with pytest-benchmark; fail when its GPU time is slower than the reference's.

    GPU time (bench.environment.kernel_time_ms, as bench/kernels.py): the summed kernel time of KERNEL_CALLS
    calls. Wall-clock timers such as do_bench also count the host's dispatch whenever it outlasts the GPU
    work before it, which eager autograd dispatch of a ~0.1 ms op does and compiled code, where these ops
    run in the model, does not.
    """
    reference_ms = kernel_time_ms(reference, calls=KERNEL_CALLS)
    fast_ms = kernel_time_ms(fast, calls=KERNEL_CALLS)
    benchmark.extra_info.update(fast_ms=fast_ms, reference_ms=reference_ms, speedup=reference_ms / fast_ms)
    benchmark_gpu(benchmark, fast)
    assert fast_ms <= reference_ms * (1 + NOISE_MARGIN), (
        f"{what}: the fast path takes {fast_ms:.4f} ms of GPU time, slower than the compiled reference's "
        f"{reference_ms:.4f} ms ({reference_ms / fast_ms:.2f}x)"
    )


@pytest.mark.benchmark(group="forward")
@pytest.mark.parametrize("op", OPS)
def test_fast_op_forward_not_slower_than_compiled(benchmark, op):
    check_not_slower(benchmark, f"{op} forward", op_forward(op, "fast"), op_forward(op, "compiled"))


@pytest.mark.benchmark(group="block forward")
def test_fast_block_forward_not_slower_than_reference(benchmark):
    check_not_slower(benchmark, "DiT-XL/2 block forward", block_forward("fast"), block_forward("reference"))


@pytest.mark.benchmark(group="forward")
@pytest.mark.parametrize("op", OPS)
def test_compiled_op_forward(benchmark, op):
    benchmark_gpu(benchmark, op_forward(op, "compiled"))


@pytest.mark.benchmark(group="block forward")
def test_reference_block_forward(benchmark):
    benchmark_gpu(benchmark, block_forward("reference"))


@pytest.mark.benchmark(group="forward+backward")
@pytest.mark.parametrize("impl", ["fast", "compiled"])
@pytest.mark.parametrize("op", OPS)
def test_op_forward_backward(benchmark, op, impl):
    benchmark_gpu(benchmark, op_forward_backward(op, impl))
