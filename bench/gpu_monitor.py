"""The GPU's SM clock and power draw while a benchmark runs, polled by nvidia-smi: shows power capping.

An H200 held at its 700 W limit lowers its SM clock: in a sustained DiT-XL/2 sampling run (session 6) it
went from 1980 MHz to 1515-1530 MHz after about ten 55 ms steps, and the step time rose from 54.6 to 58.6 ms.
Short timings (20 steps, a 10-call profile) see mostly the full clock; long runs (a 250-step batch) do not.
Benchmarks that run long record this summary beside their figures, so the two kinds can be told apart.

    with GpuMonitor() as monitor:
        run()
    monitor.summary()  # None when nvidia-smi is missing or gave no samples
"""
import statistics
import subprocess

import torch

QUERY = ("clocks.sm", "power.draw", "power.limit", "clocks_throttle_reasons.sw_power_cap")


def _device_selector() -> list[str]:
    """nvidia-smi's `-i` for torch's current device, by PCI address (CUDA_VISIBLE_DEVICES renumbers indices)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if all(hasattr(props, name) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        return ["-i", f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"]
    return ["-i", str(torch.cuda.current_device())]


def summarize(lines: list[str]) -> dict | None:
    """Median and lowest SM clock, median power, the limit and the share of samples capped by power."""
    samples = []
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(QUERY):
            continue
        try:
            clock, power, limit = float(fields[0]), float(fields[1]), float(fields[2])
        except ValueError:  # "[N/A]" or a header
            continue
        samples.append((clock, power, limit, fields[3].lower() == "active"))
    if not samples:
        return None
    clocks = [s[0] for s in samples]
    return {
        "samples": len(samples),
        "sm_clock_mhz_median": statistics.median(clocks),
        "sm_clock_mhz_min": min(clocks),
        "power_w_median": round(statistics.median(s[1] for s in samples), 1),
        "power_limit_w": samples[-1][2],
        "power_capped_fraction": round(sum(s[3] for s in samples) / len(samples), 3),
    }


class GpuMonitor:
    """Polls nvidia-smi every `interval_ms` inside a `with` block; `summary()` afterwards (None without samples)."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self._process: subprocess.Popen | None = None
        self._lines: list[str] = []

    def __enter__(self) -> "GpuMonitor":
        command = ["nvidia-smi", *_device_selector(), f"--query-gpu={','.join(QUERY)}",
                   "--format=csv,noheader,nounits", "--loop-ms", str(self.interval_ms)]  # fmt: skip
        try:
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: the benchmark still runs, without the summary
            self._process = None
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._process.terminate()
        output, _ = self._process.communicate(timeout=10)
        self._lines = output.splitlines()

    def summary(self) -> dict | None:
        return summarize(self._lines)
