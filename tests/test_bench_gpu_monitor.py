"""bench/gpu_monitor.py: the summary of nvidia-smi samples, and a benchmark that goes on without nvidia-smi."""
import subprocess

from bench import gpu_monitor


def test_summary_of_capped_and_free_samples():
    lines = [
        "1980, 122.96, 700.00, Not Active",
        "1530, 692.88, 700.00, Active",
        "[N/A], 690.00, 700.00, Active",  # unreadable clock: skipped
        "1515, 692.43, 700.00, Active",
        "garbage",
    ]
    summary = gpu_monitor.summarize(lines)
    assert summary == {
        "samples": 3,
        "sm_clock_mhz_median": 1530.0,
        "sm_clock_mhz_min": 1515.0,
        "power_w_median": 692.4,
        "power_limit_w": 700.0,
        "power_capped_fraction": round(2 / 3, 3),
    }


def test_no_samples_give_no_summary():
    assert gpu_monitor.summarize([]) is None
    assert gpu_monitor.summarize(["[N/A], [N/A], [N/A], [N/A]"]) is None


def test_missing_nvidia_smi_leaves_the_block_running(monkeypatch):
    def no_such_program(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_monitor, "_device_selector", lambda: ["-i", "0"])
    monkeypatch.setattr(subprocess, "Popen", no_such_program)
    ran = []
    with gpu_monitor.GpuMonitor() as monitor:
        ran.append(True)
    assert ran == [True] and monitor.summary() is None
