"""Checkpoints of dit_fast.train: exact resume, a kill during a checkpoint write, keep-last, and 2 ranks vs 1 (gloo).

Training runs in subprocesses (DiT-debug, CPU, a few steps): a kill is a real process exit, and a
torchrun launch is a real 2-rank job. Exactness on the CPU is bitwise: losses, gradient norms, and the
final model, EMA and optimizer state.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dit_fast.train import main
from dit_fast.train_state import TMP_SUFFIX, complete_checkpoints, latest_checkpoint

RUN = "debug"
BASE_ARGS = [
    "--model", "DiT-debug", "--global-batch-size", "8", "--log-every", "1", "--sample-every", "0",
    "--num-workers", "0", "--ema-decay", "0.9", "--lr", "1e-3", "--run-name", RUN,
]  # fmt: skip
STEPS = 8


def run_training(
    argv: list[str], hooks: str = "None", nproc: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    """dit_fast.train.main(argv, hooks=<hooks source>) in a fresh process, or nproc of them under torchrun."""
    code = (
        "from dit_fast.train import main; from dit_fast.train_hooks import TrainHooks; "
        f"main({argv!r}, hooks={hooks})"
    )
    if nproc == 1:
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "--no-python", sys.executable, "-c", code]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(results_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) of every logged step of the run."""
    lines = (results_dir / RUN / "metrics.jsonl").read_text().splitlines()
    return [(row["step"], row["loss"], row["grad_norm"]) for row in map(json.loads, lines)]


def checkpoint_tensors(path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optim, ema), flattened to dotted names."""
    single = tmp_path / f"{path.name}-{os.getpid()}.pt"
    dcp_to_torch_save(path, single)
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    visit("", torch.load(single, weights_only=False))
    return flat


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(key.startswith("optim.") for key in a) and any(key.startswith("ema.") for key in a)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """STEPS steps without interruption, checkpoints every 4 steps."""
    results = tmp_path_factory.mktemp("straight")
    done = run_training(BASE_ARGS + ["--max-steps", str(STEPS), "--ckpt-every", "4", "--results-dir", str(results)])
    assert done.returncode == 0, done.stderr[-3000:]
    return results


def test_resume_after_kill_is_bitwise_identical(straight_run, tmp_path):
    argv = BASE_ARGS + ["--max-steps", str(STEPS), "--ckpt-every", "4", "--results-dir", str(tmp_path)]
    killed = run_training(argv, hooks=f"TrainHooks(exit_after_step={STEPS // 2})")
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(tmp_path / RUN / "checkpoints")] == ["0000004"]
    resumed = run_training(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (tmp_path / RUN / "log.txt").read_text()
    assert metrics(tmp_path) == metrics(straight_run)
    final = f"checkpoints/{STEPS:07d}"
    assert_same_state(
        checkpoint_tensors(straight_run / RUN / final, tmp_path), checkpoint_tensors(tmp_path / RUN / final, tmp_path)
    )


def test_a_checkpoint_resumes_under_the_other_fsdp_units(straight_run, tmp_path):
    """The straight run (one rank: the whole model is one FSDP unit) resumed from step 4 with a unit per block,
    what several ranks use: the same names and shards, so the same losses and final state, bitwise."""
    middle = straight_run / RUN / f"checkpoints/{STEPS // 2:07d}"
    argv = BASE_ARGS + ["--max-steps", str(STEPS), "--ckpt-every", "4", "--results-dir", str(tmp_path),
                        "--fsdp-units", "block", "--resume", str(middle)]  # fmt: skip
    resumed = run_training(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "FSDP units root" in (straight_run / RUN / "log.txt").read_text()
    log = (tmp_path / RUN / "log.txt").read_text()
    assert "FSDP units block" in log and "resumed from" in log
    assert metrics(tmp_path) == metrics(straight_run)[STEPS // 2 :]
    final = f"checkpoints/{STEPS:07d}"
    assert_same_state(
        checkpoint_tensors(straight_run / RUN / final, tmp_path), checkpoint_tensors(tmp_path / RUN / final, tmp_path)
    )


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(straight_run, tmp_path):
    argv = BASE_ARGS + ["--max-steps", str(STEPS), "--ckpt-every", "2", "--results-dir", str(tmp_path)]
    killed = run_training(argv, hooks="TrainHooks(exit_during_checkpoint_at_step=4)")
    assert killed.returncode == 1, killed.stderr[-3000:]
    checkpoints = tmp_path / RUN / "checkpoints"
    assert (checkpoints / ("0000004" + TMP_SUFFIX)).is_dir()  # the interrupted write
    assert latest_checkpoint(checkpoints).name == "0000002"
    resumed = run_training(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / RUN / "log.txt").read_text()
    assert "resumed from" in log and "0000002 at step 2" in log
    assert not list(checkpoints.glob(f"*{TMP_SUFFIX}"))  # removed by the next save
    logged, reference = metrics(tmp_path), metrics(straight_run)
    assert logged[:4] == reference[:4]  # steps 1-4 before the kill
    assert logged[4:] == reference[2:]  # steps 3-8 after resuming from step 2
    assert_same_state(
        checkpoint_tensors(straight_run / RUN / f"checkpoints/{STEPS:07d}", tmp_path),
        checkpoint_tensors(checkpoints / f"{STEPS:07d}", tmp_path),
    )


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    main(BASE_ARGS + ["--max-steps", "5", "--ckpt-every", "1", "--keep-last", "2", "--results-dir", str(tmp_path)])
    names = [p.name for p in complete_checkpoints(tmp_path / RUN / "checkpoints")]
    assert names == ["0000004", "0000005"]


def test_two_ranks_match_one_and_their_checkpoint_resumes_on_one(straight_run, tmp_path):
    """gloo, 2 processes at global batch 8 vs 1 process: the same samples and noise, so the same loss curve
    up to bf16 rounding of the different per-rank batch shapes; the 2-rank checkpoint of step 4 resumes on 1."""
    two = tmp_path / "two"
    argv = BASE_ARGS + ["--max-steps", str(STEPS // 2), "--ckpt-every", "4", "--results-dir", str(two)]
    done = run_training(argv, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = metrics(straight_run)
    for (step, loss, grad_norm), (ref_step, ref_loss, ref_grad_norm) in zip(metrics(two), reference):
        assert step == ref_step
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert grad_norm == pytest.approx(ref_grad_norm, rel=1e-3)
    checkpoint = two / RUN / "checkpoints" / f"{STEPS // 2:07d}"
    sharded = checkpoint_tensors(checkpoint, tmp_path)
    whole = checkpoint_tensors(straight_run / RUN / "checkpoints" / f"{STEPS // 2:07d}", tmp_path)
    ema_names = [name for name in whole if name.startswith("ema.")]
    ema_gap = max((sharded[n] - whole[n]).abs().max().item() for n in ema_names)
    ema_lag = max((whole[n] - whole[n.replace("ema.", "model.", 1)]).abs().max().item() for n in ema_names)
    assert ema_gap < 3e-4 and ema_lag > 10 * ema_gap  # the sharded EMA tracks the same average
    one = tmp_path / "one"
    resumed = run_training(BASE_ARGS + ["--max-steps", str(STEPS), "--ckpt-every", "4", "--results-dir", str(one),
                                        "--resume", str(checkpoint)])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for (step, loss, _), (ref_step, ref_loss, _) in zip(metrics(one), reference[STEPS // 2 :]):
        assert step == ref_step
        assert loss == pytest.approx(ref_loss, rel=1e-3)


def test_epochs_roll_over_the_same_with_and_without_loader_workers(tmp_path):
    """40 items in global batches of 8: 5 steps per epoch; 12 steps cross two epoch boundaries."""
    argv = BASE_ARGS + ["--synthetic-size", "40", "--max-steps", "12", "--ckpt-every", "12"]
    main([*argv, "--results-dir", str(tmp_path / "inline")])
    main([*argv, "--results-dir", str(tmp_path / "workers"), "--num-workers", "2"])
    assert metrics(tmp_path / "workers") == metrics(tmp_path / "inline")
    rows = [json.loads(line) for line in (tmp_path / "inline" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0] * 5 + [1] * 5 + [2] * 2
