"""What every benchmark shares: the environment record, the two measured ceilings, timing, and saving JSON."""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def require_cuda(script: str) -> None:
    """Exit with a clear message on a machine without CUDA: timings need a GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: timing needs a CUDA GPU and none is visible here; run it on a GPU machine")


def git_commit() -> str:
    """The checked-out commit, '+dirty' when the tree has uncommitted changes, or 'unknown' outside git.

    DIT_FAST_COMMIT overrides it, for copies of the tree without .git (a GPU machine given the files only).
    """
    if os.environ.get("DIT_FAST_COMMIT"):
        return os.environ["DIT_FAST_COMMIT"]
    root = os.path.dirname(RESULTS_DIR)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def environment() -> dict:
    """GPU, software versions and commit for a results file."""
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), sms=props.multi_processor_count)
    return info


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() by CUDA events, one event pair per call, after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def back_to_back_ms(fn: Callable[[], object], iters: int, warmup: int = 0) -> list[float]:
    """Per-call ms of `iters` calls of fn launched back to back, as a training or sampling loop runs them: CUDA
    events around each call, no host sync between calls (so the host's launch latency hides behind the GPU's
    work, where `time_ms` pays it once per call), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def kernel_time_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """GPU ms per call of fn: the summed device time of every kernel, copy and memset that `calls` calls
    launch, under torch.profiler, after warm-up calls. Host overhead (Python, autograd, op dispatch) and the
    gaps it leaves do not count: in a training step the host runs ahead of the GPU and hides them.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return device_us / 1e3 / calls


def copy_bandwidth_gbps() -> float:
    """Device copy bandwidth, bytes read + written, of a 2 GiB device-to-device copy (well past the 60 MB L2)."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_peak_tflops(n: int = 8192) -> float:
    """bf16 matrix-product rate of an n^3 product on random data: the MFU denominator."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / ms / 1e9


def slug(gpu_name: str) -> str:
    """A GPU name as it appears in results file names: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def gpu_slug() -> str:
    return slug(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def save_report(report: dict, name: str, out: str | None = None) -> str:
    """Write the report as JSON to `out` or bench/results/<name>-<gpu>.json; returns the path."""
    path = out or os.path.join(RESULTS_DIR, f"{name}-{gpu_slug()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def benchmark_main(argv: list[str] | None, name: str, doc: str, quick_help: str, run, markdown) -> None:
    """The command line every single-question benchmark shares: --quick, --out; run, print tables, save JSON."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None, help=f"JSON path (default bench/results/{name}-<gpu>.json)")
    args = parser.parse_args(argv)
    require_cuda(f"bench/{name}.py")
    report = run(args.quick)
    print(markdown(report))
    print("\nwrote", save_report(report, name, args.out))
