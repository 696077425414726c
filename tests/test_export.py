"""`python -m dit_fast.export`: a training checkpoint's EMA as the official single-file state dict."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_fast.checkpoint import load_model
from dit_fast.export import main as export_main
from dit_fast.export import read_ema_state
from dit_fast.model import create_model
from dit_fast.train import main as train_main
from tests.test_train_state import BASE_ARGS, RUN, checkpoint_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """DiT-debug after 3 steps at a large learning rate, so the EMA differs from the init and the model."""
    results = tmp_path_factory.mktemp("export")
    train_main(BASE_ARGS + ["--max-steps", "3", "--ckpt-every", "3", "--lr", "1e-2", "--results-dir", str(results)])
    return results / RUN


def test_export_loads_strictly_with_the_official_keys(trained_run, tmp_path):
    out = tmp_path / "ema.pt"
    export_main(["--ckpt", str(trained_run), "--out", str(out)])  # a run directory: its latest checkpoint
    state = torch.load(out, weights_only=True)
    assert list(state) == list(create_model("DiT-debug").state_dict())
    assert all(tensor.dtype == torch.float32 for tensor in state.values())
    on_disk = checkpoint_tensors(trained_run / "checkpoints" / "0000003", tmp_path)
    for name, tensor in state.items():
        assert torch.equal(tensor, on_disk[f"ema.{name}"]), name
    assert not torch.equal(state["final_layer.linear.weight"], on_disk["model.final_layer.linear.weight"])
    model = load_model("DiT-debug", out)  # strict
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_export_runs_as_a_module_and_loads_in_sample_py(trained_run, tmp_path):
    out = tmp_path / "ema.pt"
    exported = subprocess.run(
        [sys.executable, "-m", "dit_fast.export", "--ckpt", str(trained_run / "checkpoints" / "0000003"),
         "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "EMA weights of DiT-debug at 64px" in exported.stdout and "step 3" in exported.stdout
    sampled = subprocess.run(
        [sys.executable, "sample.py", "--model", "DiT-debug", "--ckpt", str(out), "--no-vae",
         "--class-labels", "0", "1", "--steps", "5", "--out", str(tmp_path / "samples"), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-2000:]


def test_export_to_safetensors(trained_run, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed here")
    out = tmp_path / "ema.safetensors"
    export_main(["--ckpt", str(trained_run), "--out", str(out), "--safetensors"])
    state = safetensors_torch.load_file(str(out))
    reference, _ = read_ema_state(trained_run)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[name], reference[name]) for name in state)
    loaded = load_model("DiT-debug", out)  # strict, as sample.py loads it
    assert all(torch.equal(loaded.state_dict()[name], reference[name]) for name in state)


def test_export_names_a_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    assert "is neither a complete checkpoint nor a run directory with one" in capsys.readouterr().err
