"""Launch-config sweep of the adaLN kernels on one GPU: which tile, warps and chunk size move the most bytes.

For ln_modulate, gated_residual_ln_modulate and gated_residual, forward and backward (final_layer: its fused
forward kernel's tokens, column chunk and warps), at DiT-XL/2 width
(D = 1152, bf16) and B*T = 32768 rows (B=128 T=256, and B=32 T=1024), it times the kernel launchers of
kernels/ (`_forward` / `_backward`) with the default launch rule and with each config of a small grid,
next to Inductor's compiled reference of the same pass. Every config's outputs are first compared with the
default config's (bf16 tolerance); a config that disagrees is reported and not timed.

Timing is GPU time without host overhead (bench.environment.kernel_time_ms: summed kernel device time under
torch.profiler; the committed H200 run of 2026-11-22 timed replays of CUDA graphs instead, its rows'
"timing": "graph"). Every tensor is >= 75 MB, past the 60 MB L2.
GB/s counts the minimal bytes of bench/kernels.py's formulas; copy bandwidth is measured in the same run.
A profile of final_layer's forward+backward (fused and compiled reference) lists its kernels' GPU times.

    python -m bench.kernel_sweep [--out bench/results/kernel_sweep-<gpu>.json]
"""
import argparse
import importlib
from typing import Callable

import torch

from bench.environment import copy_bandwidth_gbps, environment, kernel_time_ms, require_cuda, save_report
from bench.kernels import OP_CASES
from bench.model import kernel_profile

fl = importlib.import_module("dit_fast.kernels.final_layer")
gr = importlib.import_module("dit_fast.kernels.gated_residual")  # the modules (the package exports functions
ln = importlib.import_module("dit_fast.kernels.ln_modulate")  # of the same names)

SHAPES = ((128, 256), (32, 1024))
LN_FWD = [ln.LaunchConfig(r, w) for r, w in ((1, 8), (1, 4), (1, 2), (2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8), (8, 16))]
LN_FWD_TMA = [  # plain ln_modulate's TMA forward
    ln.TmaConfig(r, w, s, p)  # rows, warps, pipeline stages, programs per SM
    for r, w, s, p in (
        (4, 2, 3, 4), (4, 2, 4, 4), (4, 2, 2, 4), (4, 2, 3, 8), (4, 1, 3, 4), (2, 1, 3, 8), (2, 1, 4, 8),
        (4, 4, 3, 4), (4, 4, 2, 4), (2, 2, 3, 8), (2, 2, 2, 8), (8, 4, 3, 2), (8, 8, 2, 2), (4, 8, 3, 4),
    )
]  # fmt: skip
LN_BWD = [
    ln.LaunchConfig(r, w, c)
    for r, w, c in (
        (1, 8, 64), (1, 8, 32), (1, 8, 16), (1, 4, 64), (1, 4, 32), (1, 4, 16), (1, 2, 32),
        (2, 4, 32), (2, 4, 64), (2, 8, 32), (2, 8, 64), (4, 8, 64), (4, 4, 32), (2, 4, 16),
    )
]  # fmt: skip
LN_BWD_TMA = [  # plain ln_modulate's TMA backward
    ln.TmaBackwardConfig(r, w, s, c)  # rows, warps, pipeline stages, rows per program
    for r, w, s, c in (
        (2, 2, 3, 64), (2, 2, 3, 32), (2, 2, 3, 128), (2, 2, 2, 64), (2, 2, 4, 64), (1, 1, 3, 64), (1, 2, 3, 64),
        (2, 4, 3, 64), (4, 4, 3, 64), (4, 2, 3, 64),
    )
]  # fmt: skip
GR_FWD = [gr.LaunchConfig(r, b, w) for r, b, w in ((16, 128, 8), (8, 128, 4), (32, 128, 8), (16, 256, 8), (4, 1024, 8), (8, 1024, 16), (32, 128, 16))]
GR_BWD = [
    gr.LaunchConfig(r, b, w, c)
    for r, b, w, c in (
        (16, 128, 8, 64), (16, 128, 8, 32), (16, 128, 8, 16), (16, 128, 4, 64), (32, 128, 8, 64),
        (8, 128, 4, 32), (16, 256, 8, 64), (8, 256, 4, 64), (4, 1024, 8, 32), (8, 1024, 16, 64),
        (32, 128, 4, 128), (64, 128, 8, 128),
    )
]  # fmt: skip

FL_FWD = [
    fl.ForwardConfig(m, k, w)
    for m, k, w in (
        (16, 128, 4), (64, 128, 4), (64, 128, 8), (32, 256, 8), (32, 64, 4), (16, 256, 4), (64, 64, 4),
        (32, 128, 8), (128, 64, 8), (16, 64, 2), (32, 256, 4), (16, 128, 2),
    )
]  # fmt: skip
GRIDS = {  # op: (forward configs, backward configs)
    "ln_modulate": (LN_FWD + LN_FWD_TMA, LN_BWD + LN_BWD_TMA),
    "gated_residual_ln_modulate": (LN_FWD, LN_BWD),
    "gated_residual": (GR_FWD, GR_BWD),
    "final_layer": (FL_FWD, []),
}


def _case(op: str):
    """bench/kernels.py's OpCase of op: its references, inputs (strided chunk views for the per-sample
    vectors) and bytes formulas."""
    return next(case for case in OP_CASES if case.name == op)


def _launchers(op: str, inputs: dict, grad: dict) -> tuple[Callable, Callable]:
    """(forward(config), backward(config)) calling the op's kernel launchers directly, no autograd."""
    x, shift, scale = inputs["x"].detach(), inputs.get("shift"), inputs.get("scale")
    if op == "final_layer":
        shift, scale, weight, bias = (inputs[n].detach() for n in ("shift", "scale", "weight", "bias"))
        return (lambda c: fl._launch_forward(x, shift, scale, weight, bias, 1e-6, c or fl.ForwardConfig())[:2], None)
    if op == "gated_residual":
        y, gate = inputs["y"].detach(), inputs["gate"].detach()
        return (lambda c: gr._forward(x, y, gate, c), lambda c: gr._backward(grad["out"], y, gate, c))
    shift, scale = shift.detach(), scale.detach()
    if op == "ln_modulate":
        _, _, mean, rstd = ln._forward(x, None, None, shift, scale, 1e-6)
        return (
            lambda c: ln._forward(x, None, None, shift, scale, 1e-6, c)[1:2],
            lambda c: ln._backward(grad["h"], None, x, None, None, scale, mean, rstd, c),
        )
    y, gate = inputs["y"].detach(), inputs["gate"].detach()
    x_new, _, mean, rstd = ln._forward(x, y, gate, shift, scale, 1e-6)
    return (
        lambda c: ln._forward(x, y, gate, shift, scale, 1e-6, c)[:2],
        lambda c: ln._backward(grad["h"], grad["x_new"], x_new, y, gate, scale, mean, rstd, c),
    )


def _compiled_passes(op: str, inputs: dict) -> tuple[Callable, Callable]:
    """(forward, backward) of torch.compile(<op>_ref), recording autograd as in training."""
    compiled = torch.compile(_case(op).reference)
    leaves = list(inputs.values())
    outputs = compiled(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = [torch.randn_like(o) for o in outputs]
    return (lambda: compiled(**inputs), lambda: torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True))


def _agree(candidate, expected) -> bool:
    return all(
        a is None or torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2) for a, b in zip(candidate, expected)
    )


def sweep_case(op: str, B: int, T: int, copy_gbps: float, passes: tuple[str, ...] = ("fwd", "bwd")) -> list[dict]:
    """Rows for one (op, shape): compiled reference and every config of the given passes."""
    case = _case(op)
    inputs = case.make_inputs(B, T)
    x = inputs["x"]
    grad = {"out": torch.randn_like(x), "h": torch.randn_like(x), "x_new": torch.randn_like(x)}
    forward, backward = _launchers(op, inputs, grad)
    grids = GRIDS[op]
    compiled_fwd, compiled_bwd = _compiled_passes(op, inputs)
    rows = []
    for pas, launch, configs, nbytes, compiled in (
        ("fwd", forward, grids[0], case.forward_bytes(B, T), compiled_fwd),
        ("bwd", backward, grids[1], case.backward_bytes(B, T), compiled_bwd),
    ):
        if not configs or pas not in passes:  # final_layer: forward configs only
            continue
        rows.append(_row(op, B, T, pas, "compiled", kernel_time_ms(compiled), nbytes, copy_gbps))
        expected = [t for t in launch(None) if t is not None]
        for config in [None, *configs]:
            label = "default" if config is None else f"{type(config).__name__}{tuple(config)}"
            try:
                if not _agree([t for t in launch(config) if t is not None], expected):
                    rows.append({"op": op, "B": B, "T": T, "pass": pas, "impl": label, "error": "outputs disagree"})
                    continue
                ms = kernel_time_ms(lambda: launch(config))
            except Exception as error:  # a config the compiler rejects (registers, shared memory): report it
                rows.append({"op": op, "B": B, "T": T, "pass": pas, "impl": label, "error": repr(error)[:200]})
                continue
            rows.append(_row(op, B, T, pas, label, ms, nbytes, copy_gbps))
            print(_line(rows[-1]), flush=True)
    return rows


def _row(op, B, T, pas, impl, ms, nbytes, copy_gbps) -> dict:
    gbps = nbytes / ms / 1e6
    return {"op": op, "B": B, "T": T, "pass": pas, "impl": impl, "ms": ms, "gbps": gbps, "copy_fraction": gbps / copy_gbps}


def _line(row: dict) -> str:
    return f"{row['op']:28s} B={row['B']:<4d} T={row['T']:<5d} {row['pass']:4s} {row['impl']:20s} {row['ms']:.4f} ms {row['copy_fraction']:.0%}"


def final_layer_profile(B: int = 256, T: int = 256) -> dict:
    """bench.model's GPU-time profile (costliest kernels) of one forward+backward of final_layer and of its
    compiled reference."""
    case = _case("final_layer")
    inputs = case.make_inputs(B, T)
    leaves = list(inputs.values())
    result = {}
    for impl, fn in (("triton", case.fused), ("compiled", torch.compile(case.reference))):
        def step():
            out = fn(**inputs)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        for _ in range(3):
            step()
        result[impl] = kernel_profile(step, iters=1)["top_kernels"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernel_sweep-<gpu>.json)")
    parser.add_argument("--ops", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    args = parser.parse_args(argv)
    require_cuda("bench/kernel_sweep.py")
    torch.manual_seed(0)
    # Inductor's donated buffers (a memory saving) forbid the retained-graph backward timed here.
    torch._functorch.config.donated_buffer = False
    copy_gbps = copy_bandwidth_gbps()
    rows = []
    for op in args.ops:
        for B, T in SHAPES:
            rows += sweep_case(op, B, T, copy_gbps, tuple(args.passes))
            torch.cuda.empty_cache()
    report = {"benchmark": "kernel_sweep", "env": environment(), "copy_gbps": copy_gbps, "rows": rows,
              "final_layer_profile": final_layer_profile()}  # fmt: skip
    print(markdown(report))
    print("\nwrote", save_report(report, "kernel_sweep", args.out))


def markdown(report: dict) -> str:
    """Per (op, shape, pass): compiled reference, default config and the best config, with % of copy."""
    lines = ["| op | B | T | pass | compiled ms | default ms | best config | best ms | best % copy | x compiled |", "|---|---|---|---|---|---|---|---|---|---|"]
    timed = [r for r in report["rows"] if "ms" in r]
    keys = sorted({(r["op"], r["B"], r["T"], r["pass"]) for r in timed}, key=lambda k: (k[0], -k[1], k[3]))
    for key in keys:
        group = [r for r in timed if (r["op"], r["B"], r["T"], r["pass"]) == key]
        compiled = next((r for r in group if r["impl"] == "compiled"), None)
        default = next((r for r in group if r["impl"] == "default"), None)
        best = min((r for r in group if r["impl"] != "compiled"), key=lambda r: r["ms"])
        c_ms = compiled["ms"] if compiled else float("nan")
        d_ms = default["ms"] if default else float("nan")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {c_ms:.4f} | {d_ms:.4f} | {best['impl']} | {best['ms']:.4f} "
            f"| {best['copy_fraction']:.0%} | {c_ms / best['ms']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
