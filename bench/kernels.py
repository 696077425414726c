"""Fused Triton ops against their PyTorch references: eager, torch.compile (Inductor) and Triton, bf16.

Ops: ln_modulate, gated_residual_ln_modulate, gated_residual, final_layer, bias_gelu (the MLP's bias + tanh
GELU, on the (M, 4D) hidden activation), at DiT-XL/2 widths (D = 1152, MLP hidden 4608, final layer O = 32): 256px (T = 256) with B = 128 and 256, 512px (T = 1024) with B = 32 and 64. Each is
timed forward (recording autograd, as in training), backward (autograd.grad of a retained graph) and
forward+backward, as GPU time: the summed device time of the kernels of 10 calls under torch.profiler
(bench.environment.kernel_time_ms), so the host overhead of eager autograd and op dispatch, hidden behind
the GPU in a real training step, does not count (figures before 2026-11-22 used triton.testing.do_bench,
which counted it where the GPU waited for it). Every activation here is >= 75 MB, past the H200's L2.
Compile time of the Inductor reference is measured apart (first forward+backward call).
Bandwidth is the op's minimal traffic (the bytes formulas in OP_CASES, the same for all three
implementations) over the median time, and its ratio to the device copy bandwidth measured in the same
process (a large device-to-device copy, read + write bytes).

    python -m bench.kernels [--quick] [--out bench/results/kernels-<gpu>.json]
"""
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench.environment import benchmark_main, copy_bandwidth_gbps, git_commit, kernel_time_ms

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

DTYPE = torch.bfloat16
ELEMENT_BYTES = 2  # bf16
STATS_BYTES = 4  # fp32 mean, rstd per row
WIDTH = 1152  # DiT-XL/2 hidden size D
MLP_HIDDEN = 4 * WIDTH  # DiT's mlp_ratio 4
FINAL_OUT = 32  # DiT-XL/2 final layer O = patch 2 * 2 * (4 latent channels * 2 for learned sigma)
SHAPES = ((128, 256), (256, 256), (32, 1024), (64, 1024))  # (B, T): 256px and 512px training batches
QUICK_SHAPES = ((256, 256), (64, 1024))
PASSES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("eager", "compiled", "triton")


@dataclass(frozen=True)
class OpCase:
    """One op to benchmark: its fused and reference functions, inputs, and minimal bytes moved per pass."""

    name: str
    fused: Callable
    reference: Callable
    make_inputs: Callable[[int, int], dict]  # (B, T) -> keyword tensors, all requiring grad
    forward_bytes: Callable[[int, int], int]  # (B, T) -> bytes read + written by one forward
    backward_bytes: Callable[[int, int], int]  # (B, T) -> bytes read + written by one backward


def _activation(B: int, T: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(B, T, width, device="cuda", dtype=DTYPE, requires_grad=True)  # (B, T, width)


def _modulation(B: int, n: int) -> tuple:
    """The strided (B, D) views of one adaLN Linear output, (B, n*D).chunk(n), as leaves requiring grad."""
    return tuple(v.detach().requires_grad_() for v in torch.randn(B, n * WIDTH, device="cuda", dtype=DTYPE).chunk(n, 1))


def _ln_modulate_inputs(B: int, T: int) -> dict:
    shift, scale = _modulation(B, 2)
    return {"x": _activation(B, T), "shift": shift, "scale": scale}


def _gated_residual_ln_modulate_inputs(B: int, T: int) -> dict:
    gate, shift, scale = _modulation(B, 3)
    return {"x": _activation(B, T), "y": _activation(B, T), "gate": gate, "shift": shift, "scale": scale}


def _gated_residual_inputs(B: int, T: int) -> dict:
    (gate,) = _modulation(B, 1)
    return {"x": _activation(B, T), "y": _activation(B, T), "gate": gate}


def _final_layer_inputs(B: int, T: int) -> dict:
    shift, scale = _modulation(B, 2)
    weight = (torch.randn(FINAL_OUT, WIDTH, device="cuda", dtype=DTYPE) / WIDTH**0.5).requires_grad_()  # (O, D)
    bias = torch.randn(FINAL_OUT, device="cuda", dtype=DTYPE, requires_grad=True)  # (O,)
    return {"x": _activation(B, T), "shift": shift, "scale": scale, "weight": weight, "bias": bias}


def _bias_gelu_inputs(B: int, T: int) -> dict:
    bias = torch.randn(MLP_HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)  # (H,)
    return {"z": _activation(B, T, MLP_HIDDEN), "bias": bias}


# Minimal bytes per pass, with M = B*T rows, D = WIDTH, O = FINAL_OUT, e = 2 (bf16), s = 4 (fp32 stats).
def _act(B: int, T: int, width: int = WIDTH) -> int:
    """Bytes of one (M, width) activation, M*width*e ("act")."""
    return B * T * width * ELEMENT_BYTES


def _mod(B: int) -> int:
    """Bytes of one (B, D) modulation vector, B*D*e ("mod")."""
    return B * WIDTH * ELEMENT_BYTES


def _stats(B: int, T: int) -> int:
    """Bytes of the saved mean and rstd, one fp32 each per row: 2*M*s."""
    return 2 * B * T * STATS_BYTES


OP_CASES = (
    OpCase(
        "ln_modulate",
        ln_modulate,
        ln_modulate_ref,
        _ln_modulate_inputs,
        # read x, write h: 2 act; read shift, scale: 2 mod; write mean, rstd
        lambda B, T: 2 * _act(B, T) + 2 * _mod(B) + _stats(B, T),
        # read dh, x, write dx: 3 act; read scale, write dshift, dscale: 3 mod; read mean, rstd
        lambda B, T: 3 * _act(B, T) + 3 * _mod(B) + _stats(B, T),
    ),
    OpCase(
        "gated_residual_ln_modulate",
        gated_residual_ln_modulate,
        gated_residual_ln_modulate_ref,
        _gated_residual_ln_modulate_inputs,
        # read x, y, write x_new, h: 4 act; read gate, shift, scale: 3 mod; write mean, rstd
        lambda B, T: 4 * _act(B, T) + 3 * _mod(B) + _stats(B, T),
        # read dh, dx_new, x_new, y, write dx, dy: 6 act; read gate, scale, write dgate, dshift, dscale: 5 mod
        lambda B, T: 6 * _act(B, T) + 5 * _mod(B) + _stats(B, T),
    ),
    OpCase(
        "gated_residual",
        gated_residual,
        gated_residual_ref,
        _gated_residual_inputs,
        # read x, y, write out: 3 act; read gate: 1 mod
        lambda B, T: 3 * _act(B, T) + _mod(B),
        # read dout, y, write dy: 3 act (dx is dout itself); read gate, write dgate: 2 mod
        lambda B, T: 3 * _act(B, T) + 2 * _mod(B),
    ),
    OpCase(
        "final_layer",
        final_layer,
        final_layer_ref,
        _final_layer_inputs,
        # read x: 1 act; write out (M, O); read shift, scale: 2 mod; read weight (O, D), bias (O,)
        lambda B, T: _act(B, T) + _act(B, T, FINAL_OUT) + 2 * _mod(B) + (FINAL_OUT * WIDTH + FINAL_OUT) * ELEMENT_BYTES,
        # read dout (M, O), x, write dx: 2 act + (M, O); read scale, shift, weight, write dshift, dscale,
        # dweight, dbias: 4 mod + 2 (O, D) + (O,); read mean, rstd
        lambda B, T: 2 * _act(B, T)
        + _act(B, T, FINAL_OUT)
        + 4 * _mod(B)
        + (2 * FINAL_OUT * WIDTH + FINAL_OUT) * ELEMENT_BYTES
        + _stats(B, T),
    ),
    OpCase(
        "bias_gelu",
        bias_gelu,
        bias_gelu_ref,
        _bias_gelu_inputs,
        # read z, write a: 2 (M, H) activations; read bias (H,)
        lambda B, T: 2 * _act(B, T, MLP_HIDDEN) + MLP_HIDDEN * ELEMENT_BYTES,
        # read da, z, write dz: 3 (M, H) activations; read bias, write dbias
        lambda B, T: 3 * _act(B, T, MLP_HIDDEN) + 2 * MLP_HIDDEN * ELEMENT_BYTES,
    ),
)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def time_passes(fn: Callable, inputs: dict) -> dict:
    """GPU ms of fn's forward, of its backward alone (retained graph) and of forward+backward."""
    leaves = list(inputs.values())
    outputs = _as_tuple(fn(**inputs))
    cotangents = [torch.randn_like(o) for o in outputs]

    def forward():
        fn(**inputs)

    def backward():
        torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(_as_tuple(fn(**inputs)), leaves, cotangents)

    timings = {name: kernel_time_ms(f) for name, f in (("fwd", forward), ("bwd", backward), ("fwd+bwd", forward_backward))}
    del outputs
    return timings


def compile_seconds(compiled: Callable, inputs: dict) -> float:
    """Wall time of the first forward+backward call of a torch.compile'd function (tracing + Inductor)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = _as_tuple(compiled(**inputs))
    torch.autograd.grad(outputs, list(inputs.values()), [torch.ones_like(o) for o in outputs])
    torch.cuda.synchronize()
    return time.perf_counter() - start



def run(quick: bool) -> dict:
    """Benchmark every op at every shape with all three implementations; returns the JSON-ready result."""
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU; none is visible to torch")
    import triton

    # Inductor's donated buffers (a memory saving, not a speed one) forbid backward(retain_graph=True),
    # which the backward-only timing needs.
    with torch._functorch.config.patch(donated_buffer=False):
        return _run(quick, triton.__version__)


def _run(quick: bool, triton_version: str) -> dict:
    copy_gbps = copy_bandwidth_gbps()
    results, compile_times = [], []
    for case in OP_CASES:
        for B, T in QUICK_SHAPES if quick else SHAPES:
            inputs = case.make_inputs(B, T)
            compiled = torch.compile(case.reference, dynamic=False)
            compile_times.append({"op": case.name, "B": B, "T": T, "seconds": compile_seconds(compiled, inputs)})
            implementations = {"eager": case.reference, "compiled": compiled, "triton": case.fused}
            pass_bytes = {"fwd": case.forward_bytes(B, T), "bwd": case.backward_bytes(B, T)}
            pass_bytes["fwd+bwd"] = pass_bytes["fwd"] + pass_bytes["bwd"]
            for impl, fn in implementations.items():
                for mode, ms in time_passes(fn, inputs).items():
                    gbps = pass_bytes[mode] / (ms * 1e-3) / 1e9
                    results.append(
                        {
                            "op": case.name, "B": B, "T": T, "D": WIDTH, "impl": impl, "pass": mode, "ms": ms,
                            "bytes": pass_bytes[mode], "GBps": gbps, "fraction_of_copy_bandwidth": gbps / copy_gbps,
                        }
                    )  # fmt: skip
            del inputs, compiled
            torch.cuda.empty_cache()
    return {
        "benchmark": "kernels",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "dtype": str(DTYPE),
        "width": WIDTH,
        "final_layer_out": FINAL_OUT,
        "shapes": [{"B": B, "T": T} for B, T in (QUICK_SHAPES if quick else SHAPES)],
        "copy_bandwidth_GBps": copy_gbps,
        "copy_bytes_formula": "2 * 2**31 (read + write of a 2 GiB device-to-device copy)",
        "timing": "GPU time: summed kernel device time of 10 calls under torch.profiler / 10 (bench.environment.kernel_time_ms)",
        "compile_seconds": compile_times,
        "results": results,
    }


def markdown_table(report: dict) -> str:
    """One row per (op, shape, pass): median ms of each implementation, Triton's GB/s and speed-ups."""
    cells = {(r["op"], r["B"], r["T"], r["pass"], r["impl"]): r for r in report["results"]}
    keys = list(dict.fromkeys((r["op"], r["B"], r["T"], r["pass"]) for r in report["results"]))
    lines = [
        f"kernels, {report['dtype']}, D={report['width']}, {report['gpu']}, torch {report['torch']}, "
        f"triton {report['triton']}; copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s",
        "",
        "| op | B | T | pass | eager ms | compiled ms | triton ms | triton GB/s | % of copy | x eager | x compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for op, B, T, mode in keys:
        eager, compiled, fused = (cells[(op, B, T, mode, impl)] for impl in IMPLS)
        lines.append(
            f"| {op} | {B} | {T} | {mode} | {eager['ms']:.3f} | {compiled['ms']:.3f} | {fused['ms']:.3f} "
            f"| {fused['GBps']:.0f} | {100 * fused['fraction_of_copy_bandwidth']:.0f}% "
            f"| {eager['ms'] / fused['ms']:.2f} | {compiled['ms'] / fused['ms']:.2f} |"
        )
    compile_total = sum(c["seconds"] for c in report["compile_seconds"])
    lines += ["", f"torch.compile of the references: {compile_total:.1f} s in all (first forward+backward calls)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, "kernels", __doc__, f"only (B, T) in {QUICK_SHAPES}, shorter timing", run, markdown_table)

if __name__ == "__main__":
    main()
