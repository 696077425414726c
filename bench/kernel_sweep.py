"""Launch-config sweep of ln_modulate, gated_residual_ln_modulate and gated_residual on one GPU.

Forward and backward, at DiT-XL/2 width D = 1152 in bf16, B=128 T=256 and B=32 T=1024.

For each (op, pass, shape) it times the Inductor-compiled PyTorch reference (torch.compile of `<op>_ref`,
the forward alone, or the backward alone through autograd with a retained graph), then the kernel launchers
called directly (`_forward` / `_backward` of kernels/ln_modulate.py and kernels/gated_residual.py) with the
default config (the rule in each file's header) and a small grid of explicit configs, and, for the default
config, the public op through autograd (what training runs). Every config's outputs are first checked
against an fp32 reference computed from the same bf16 inputs (max abs error, bound: 2 x the error of the
bf16 PyTorch reference + 1e-2 x (1 + max |reference|)); a config that fails is reported and not timed. Times are
triton.testing.do_bench medians (L2 cleared before each call; every tensor here is >= 75 MB, past the L2);
GB/s counts the op's minimal bytes (the formulas of bench/kernels.py) and is compared with a device copy
measured in the same run. It prints one line per config, the best config per case, and a summary table;
a time budget (--budget-s) skips the rest of a case's grid once spent, so the run stays under 4 minutes.

    python -m bench.kernel_sweep [--out bench/results/kernel_sweep-<gpu>.json] [--budget-s 150]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.bfloat16
WIDTH = 1152
SHAPES = ((128, 256), (32, 1024))
EPS = 1e-6
DEVICE = "cuda"
REP_MS = 25  # do_bench time per measurement
WARMUP_MS = 5


def _modules():
    import importlib

    ln = importlib.import_module("dit_fast.kernels.ln_modulate")
    gr = importlib.import_module("dit_fast.kernels.gated_residual")
    return ln, gr


def config_grid(op: str, mode: str) -> list:
    """Explicit configs to try after the default, for D = 1152 (BLOCK_D = 2048 for the ln kernels)."""
    ln, gr = _modules()
    if op in ("ln_modulate", "gated_residual_ln_modulate"):
        C = ln.LaunchConfig  # (rows, num_warps, rows_per_chunk, num_stages)
        if mode == "fwd":
            return [
                C(1, 8, 32, 1),  # about the old kernel: one row, no pipeline
                C(1, 4, 32, 4),
                C(2, 4, 32, 3),
                C(2, 8, 16, 3),
                C(2, 8, 64, 3),
                C(2, 8, 32, 4),
                C(2, 8, 32, 1),
                C(4, 8, 32, 3),
                C(4, 8, 32, 1),
                C(4, 8, 32, 2),
                C(4, 8, 16, 3),
                C(4, 8, 64, 3),
                C(4, 8, 128, 3),
                C(4, 8, 32, 4),
                C(4, 16, 32, 3),
                C(8, 16, 64, 3),
                C(8, 8, 64, 2),
            ]
        return [
            C(1, 8, 32, 1),  # about the old kernel
            C(1, 8, 16, 4),
            C(1, 8, 32, 4),
            C(1, 8, 128, 4),
            C(1, 8, 256, 4),
            C(1, 8, 64, 3),
            C(1, 8, 64, 2),
            C(1, 8, 64, 1),
            C(1, 4, 64, 4),
            C(1, 16, 64, 4),
            C(2, 8, 64, 4),
            C(2, 8, 64, 2),
            C(2, 16, 64, 4),
            C(4, 16, 64, 3),
        ]
    C = gr.LaunchConfig  # (rows, block_d, num_warps, rows_per_chunk, num_stages)
    if mode == "fwd":
        return [
            C(8, 128, 4),
            C(16, 128, 4),
            C(32, 128, 8),
            C(32, 128, 4),
            C(8, 256, 8),
            C(16, 256, 8),
            C(4, 512, 8),
            C(2, 1024, 8),
        ]
    return [
        C(16, 128, 8, 1024, 1),  # about the old kernel (one chunk per sample, no pipeline)
        C(16, 128, 4, 64, 4),
        C(16, 128, 8, 64, 3),
        C(32, 128, 4, 64, 3),
        C(8, 128, 4, 64, 3),
        C(16, 128, 4, 32, 3),
        C(16, 128, 4, 128, 3),
        C(16, 128, 4, 256, 3),
        C(16, 128, 4, 64, 1),
        C(16, 256, 4, 64, 3),
        C(8, 256, 4, 64, 4),
        C(32, 128, 8, 128, 4),
    ]


def make_inputs(op: str, B: int, T: int) -> dict:
    """Fresh random bf16 inputs on the GPU; modulation vectors are the strided chunk(6) views, as in DiT."""
    x = torch.randn(B, T, WIDTH, device=DEVICE, dtype=DTYPE)
    shift, scale, gate, *_ = torch.randn(B, 6 * WIDTH, device=DEVICE, dtype=DTYPE).chunk(6, dim=1)
    if op == "ln_modulate":
        return {"x": x, "shift": shift, "scale": scale}
    y = torch.randn(B, T, WIDTH, device=DEVICE, dtype=DTYPE)
    if op == "gated_residual":
        return {"x": x, "y": y, "gate": gate}
    return {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale}


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class Case:
    """One (op, pass, shape): inputs, reference outputs, and a launcher taking a config."""

    def __init__(self, op: str, mode: str, B: int, T: int):
        from bench.kernels import OP_CASES
        from dit_fast import kernels as K

        ln, gr = _modules()
        self.op, self.mode, self.B, self.T = op, mode, B, T
        spec = next(c for c in OP_CASES if c.name == op)
        self.bytes = spec.forward_bytes(B, T) if mode == "fwd" else spec.backward_bytes(B, T)
        self.inputs = make_inputs(op, B, T)
        self.ref_fn = {"ln_modulate": K.ln_modulate_ref, "gated_residual_ln_modulate": K.gated_residual_ln_modulate_ref,
                       "gated_residual": K.gated_residual_ref}[op]  # fmt: skip
        self.public_fn = {"ln_modulate": K.ln_modulate, "gated_residual_ln_modulate": K.gated_residual_ln_modulate,
                          "gated_residual": K.gated_residual}[op]  # fmt: skip
        names = list(self.inputs)
        # fp32 reference and the bf16 PyTorch reference, forward outputs and (for bwd) input gradients.
        ref32_in = {n: v.float().requires_grad_() for n, v in self.inputs.items()}
        same_in = {n: v.clone().requires_grad_() for n, v in self.inputs.items()}
        ref32_out = _as_tuple(self.ref_fn(**ref32_in))
        same_out = _as_tuple(self.ref_fn(**same_in))
        self.cotangents = [torch.randn_like(o) for o in same_out]  # bf16, fresh random
        if mode == "fwd":
            self.ref32 = [o.detach() for o in ref32_out]
            self.same = [o.detach() for o in same_out]
        else:
            self.ref32 = list(torch.autograd.grad(ref32_out, [ref32_in[n] for n in names], [c.float() for c in self.cotangents]))
            self.same = list(torch.autograd.grad(same_out, [same_in[n] for n in names], self.cotangents))
        del ref32_in, same_in, ref32_out, same_out
        i = self.inputs
        # Saved forward results for the backward launchers (default forward config).
        if op == "ln_modulate":
            _, _, self.mean, self.rstd = ln._forward(i["x"], None, None, i["shift"], i["scale"], EPS)
        elif op == "gated_residual_ln_modulate":
            self.x_new, _, self.mean, self.rstd = ln._forward(i["x"], i["y"], i["gate"], i["shift"], i["scale"], EPS)
        self.ln, self.gr = ln, gr

    def default_config(self):
        M = self.B * self.T
        module = self.gr if self.op == "gated_residual" else self.ln
        return (module.forward_config if self.mode == "fwd" else module.backward_config)(M, WIDTH)

    def launcher(self, config):
        """A no-argument callable running the op's pass with `config`; returns outputs ordered like ref32."""
        i, ln, gr = self.inputs, self.ln, self.gr
        g = self.cotangents
        if self.op == "ln_modulate":
            if self.mode == "fwd":
                return lambda: (ln._forward(i["x"], None, None, i["shift"], i["scale"], EPS, config)[1],)
            return lambda: _pick(ln._backward(g[0], None, i["x"], None, None, i["scale"], self.mean, self.rstd, config), (0, 3, 4))
        if self.op == "gated_residual_ln_modulate":
            if self.mode == "fwd":
                return lambda: ln._forward(i["x"], i["y"], i["gate"], i["shift"], i["scale"], EPS, config)[:2]
            # grads of (x, y, gate, shift, scale); cotangents are (d x_new, d h)
            return lambda: _pick(
                ln._backward(g[1], g[0], self.x_new, i["y"], i["gate"], i["scale"], self.mean, self.rstd, config),
                (0, 1, 2, 3, 4),
            )
        if self.mode == "fwd":
            return lambda: (gr._forward(i["x"], i["y"], i["gate"], config),)
        return lambda: (g[0],) + gr._backward(g[0], i["y"], i["gate"], config)  # dx is grad_out itself

    def check(self, outputs) -> tuple[bool, float, float]:
        """(ok, max abs error, bound) of outputs against the fp32 reference."""
        worst_err, worst_bound, ok = 0.0, 0.0, True
        for o, r, s in zip(outputs, self.ref32, self.same):
            err = (o.float() - r).abs().max().item()
            bound = 2 * (s.float() - r).abs().max().item() + 1e-2 * (1 + r.abs().max().item())
            if not (err <= bound) or not torch.isfinite(o).all():
                ok = False
            if err / bound >= worst_err / max(worst_bound, 1e-30):
                worst_err, worst_bound = err, bound
        return ok, worst_err, worst_bound


def _pick(values, idx):
    return tuple(values[k] for k in idx)


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _kernel_caches(case: Case) -> dict:
    """{key: CompiledKernel} of the kernels this case launches (to report registers of new variants)."""
    fns = (
        (case.gr._gated_residual_fwd_kernel, case.gr._gated_residual_bwd_kernel)
        if case.op == "gated_residual"
        else (case.ln._ln_modulate_fwd_kernel, case.ln._ln_modulate_bwd_kernel)
    )
    found = {}
    try:
        for fn in fns:
            for device, caches in fn.device_caches.items():
                for key, kernel in caches[0].items():
                    found[(fn.__name__, device, str(key))] = kernel
    except Exception:  # the cache layout is Triton-internal; registers are a bonus
        pass
    return found


def _resources(kernels) -> list:
    out = []
    for kernel in kernels:
        try:
            if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                kernel._init_handles()
            meta = kernel.metadata
            out.append({"regs": kernel.n_regs, "spills": kernel.n_spills, "shared": meta.shared,
                        "num_warps": meta.num_warps, "num_stages": getattr(meta, "num_stages", None)})  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            out.append({"error": repr(exc)})
    return out


def reference_ms(case: Case) -> tuple[float, float]:
    """(median ms, compile seconds) of the Inductor-compiled reference for the case's pass."""
    compiled = torch.compile(case.ref_fn, dynamic=False)
    leaves = {n: v.detach().requires_grad_() for n, v in case.inputs.items()}
    start = time.perf_counter()
    outputs = _as_tuple(compiled(**leaves))
    torch.autograd.grad(outputs, list(leaves.values()), case.cotangents, retain_graph=True)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    if case.mode == "fwd":
        ms = _bench(lambda: compiled(**leaves))
    else:
        ms = _bench(lambda: torch.autograd.grad(outputs, list(leaves.values()), case.cotangents, retain_graph=True))
    del outputs
    return ms, compile_s


def public_op_ms(case: Case) -> float:
    """Median ms of the public op (default configs) through autograd: the forward recording the graph, or
    the backward of a retained graph."""
    leaves = {n: v.detach().requires_grad_() for n, v in case.inputs.items()}
    if case.mode == "fwd":
        return _bench(lambda: case.public_fn(**leaves))
    outputs = _as_tuple(case.public_fn(**leaves))
    ms = _bench(lambda: torch.autograd.grad(outputs, list(leaves.values()), case.cotangents, retain_graph=True))
    del outputs
    return ms


def run_case(case: Case, copy_gbps: float, deadline: float) -> dict:
    gbps = lambda ms: case.bytes / (ms * 1e-3) / 1e9  # noqa: E731
    ref_ms, compile_s = reference_ms(case)
    label = f"{case.op} {case.mode} B={case.B} T={case.T}"
    print(f"\n== {label}: {case.bytes / 1e6:.1f} MB; Inductor reference {ref_ms:.4f} ms "
          f"({gbps(ref_ms):.0f} GB/s, {100 * gbps(ref_ms) / copy_gbps:.0f}% of copy; compiled in {compile_s:.1f} s)",
          flush=True)  # fmt: skip
    default = case.default_config()
    rows = []
    grid = [("default", default)] + [("grid", c) for c in config_grid(case.op, case.mode) if c != default]
    for kind, config in grid:
        if kind == "grid" and time.perf_counter() > deadline:
            print(f"   (time budget spent: {len(grid) - len(rows)} configs of this case skipped)", flush=True)
            break
        before = _kernel_caches(case)
        fn = case.launcher(config)
        try:
            ok, err, bound = case.check(fn())
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            print(f"   {kind:7s} {tuple(config)}: FAILED to run: {exc!r}"[:300], flush=True)
            rows.append({"kind": kind, "config": config._asdict(), "error": repr(exc)[:500]})
            continue
        new = [k for key, k in _kernel_caches(case).items() if key not in before]
        resources = _resources(new)
        row = {"kind": kind, "config": config._asdict(), "ok": ok, "max_err": err, "bound": bound, "kernels": resources}
        if ok:
            ms = _bench(fn)
            row.update(ms=ms, GBps=gbps(ms), fraction_of_copy=gbps(ms) / copy_gbps, x_inductor=ref_ms / ms)
        regs = ", ".join(f"{r.get('regs')}r/{r.get('spills')}sp/{r.get('shared')}B" for r in resources) or "cached"
        timing = (f"{row['ms']:.4f} ms {row['GBps']:6.0f} GB/s {100 * row['fraction_of_copy']:3.0f}% "
                  f"x{row['x_inductor']:.2f} vs Inductor" if ok else "NOT TIMED (wrong result)")  # fmt: skip
        print(f"   {kind:7s} {str(tuple(config)):24s} err {err:.2e} (bound {bound:.1e}) {timing}  [{regs}]", flush=True)
        rows.append(row)
    public_ms = public_op_ms(case)
    timed = [r for r in rows if r.get("ms")]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    if best:
        print(f"   best: {tuple(best['config'].values())} {best['ms']:.4f} ms, {100 * best['fraction_of_copy']:.0f}% of "
              f"copy, x{best['x_inductor']:.2f} vs Inductor; public op (default, via autograd) {public_ms:.4f} ms",
              flush=True)  # fmt: skip
    return {"op": case.op, "pass": case.mode, "B": case.B, "T": case.T, "D": WIDTH, "bytes": case.bytes,
            "inductor_ms": ref_ms, "inductor_compile_s": compile_s, "public_op_ms": public_ms,
            "configs": rows, "best": best}  # fmt: skip


def summary_table(results: list, copy_gbps: float) -> str:
    lines = [
        "| op | pass | B | T | Inductor ms | default ms | default % copy | best config | best ms | best % copy "
        "| best x Inductor | public op ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        default = next((c for c in r["configs"] if c["kind"] == "default" and c.get("ms")), None)
        best = r["best"]
        d_ms = f"{default['ms']:.4f}" if default else "-"
        d_pct = f"{100 * default['fraction_of_copy']:.0f}%" if default else "-"
        b_cfg = str(tuple(best["config"].values())) if best else "-"
        b_ms = f"{best['ms']:.4f}" if best else "-"
        b_pct = f"{100 * best['fraction_of_copy']:.0f}%" if best else "-"
        b_x = f"{best['x_inductor']:.2f}" if best else "-"
        lines.append(f"| {r['op']} | {r['pass']} | {r['B']} | {r['T']} | {r['inductor_ms']:.4f} | {d_ms} | {d_pct} "
                     f"| {b_cfg} | {b_ms} | {b_pct} | {b_x} | {r['public_op_ms']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernel_sweep-<gpu>.json)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="seconds after which each case runs only its default config (default 150)")  # fmt: skip
    parser.add_argument("--ops", default="ln_modulate,gated_residual_ln_modulate,gated_residual",
                        help="comma-separated ops to sweep")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_sweep.py needs a CUDA GPU; torch sees none here (torch.cuda.is_available() is False)")
    import triton

    from bench.kernels import copy_bandwidth_gbps, git_commit

    start = time.perf_counter()
    deadline = start + args.budget_s
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(REP_MS)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)  # fmt: skip
    results = []
    # Inductor's donated buffers forbid backward(retain_graph=True), which the backward-only timing needs.
    with torch._functorch.config.patch(donated_buffer=False):
        for op in args.ops.split(","):
            for mode in ("fwd", "bwd"):
                for B, T in SHAPES:
                    case = Case(op, mode, B, T)
                    results.append(run_case(case, copy_gbps, deadline))
                    del case
                    torch.cuda.empty_cache()
    report = {
        "benchmark": "kernel_sweep", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "git_commit": git_commit(), "dtype": str(DTYPE),
        "width": WIDTH, "copy_bandwidth_GBps": copy_gbps, "timing": f"do_bench median, rep {REP_MS} ms, L2 cleared",
        "seconds": time.perf_counter() - start, "results": results,
    }  # fmt: skip
    print("\n" + summary_table(results, copy_gbps))
    gpu_slug = report["gpu"].lower().replace(" ", "-")
    out = args.out or REPO_ROOT / "bench" / "results" / f"kernel_sweep-{gpu_slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
