"""sample.py end to end on DiT-debug (CPU): grids and files, determinism, every bad-input error before model
work, FID sample sets with resume, and a 2-process torchrun (gloo) run."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dit_fast.pipeline
import dit_fast.sample
from dit_fast import create_model
from dit_fast.sample import main
from tests.random_weights import randomize

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A DiT-debug state_dict (64px, 10 classes) with every weight random, so samples depend on the labels."""
    model = randomize(create_model("DiT-debug"))
    path = tmp_path_factory.mktemp("ckpt") / "debug.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def debug_args(checkpoint: str, out, *extra: str) -> list[str]:
    return ["--model", "DiT-debug", "--ckpt", checkpoint, "--image-size", "64", "--no-vae", "--steps", "6",
            "--no-progress", "--out", str(out), *extra]  # fmt: skip


def run_error(argv: list[str], capsys) -> str:
    """Run sample.py expecting a clean error: exit status 2 and one `sample.py: error:` message, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error: ") and "Traceback" not in err
    return err


@pytest.fixture
def no_model_work(monkeypatch):
    """Any attempt to build or load a model fails the test: errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the input was checked")

    monkeypatch.setattr(dit_fast.pipeline, "load_model", forbidden)
    monkeypatch.setattr(dit_fast.pipeline, "create_model", forbidden)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_writes_grid_per_image_files_and_latents(checkpoint, tmp_path, sampler):
    main(debug_args(checkpoint, tmp_path, "--sampler", sampler, "--class-labels", "1", "7", "3"))
    names = sorted(os.listdir(tmp_path))
    assert names == ["000_1.png", "001_7.png", "002_3.png", "labels.npy", "latents.npy", "samples.png"]
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == np.float32 and np.isfinite(latents).all()
    assert np.load(tmp_path / "labels.npy").tolist() == [1, 7, 3]
    assert Image.open(tmp_path / "001_7.png").size == (64, 64)
    assert Image.open(tmp_path / "samples.png").size == (2 + 2 * 66, 2 + 2 * 66)  # 2 x 2 grid, padding 2


def test_deterministic_under_seed(checkpoint, tmp_path):
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        main(debug_args(checkpoint, tmp_path / out, "--seed", seed, "--class-labels", "2", "5"))
    a, b, c = (np.load(tmp_path / out / "latents.npy") for out in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_fused_path_on_cpu_matches_reference(checkpoint, tmp_path):
    """--fused runs the Triton ops (in the interpreter on the CPU) through the same loop."""
    main(debug_args(checkpoint, tmp_path / "reference", "--class-labels", "2", "5"))
    main(debug_args(checkpoint, tmp_path / "fused", "--class-labels", "2", "5", "--fused", "--precision", "fp32"))
    reference, fused = (np.load(tmp_path / out / "latents.npy") for out in ("reference", "fused"))
    np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-4)


def test_default_labels_and_random_weights(tmp_path, capsys):
    main(
        [
            "--model",
            "DiT-debug",
            "--random-weights",
            "--no-vae",
            "--steps",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert np.load(tmp_path / "labels.npy").tolist() == list(range(8))
    assert "8 images, ddpm 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_class_count_comes_from_the_checkpoint(tmp_path, capsys, suffix):
    """A 3-class DiT-debug file without --num-classes: labels default to the file's classes (0, 1, 2), read from
    its label table before any model work; a label past them is an error naming the 3 classes."""
    model = create_model("DiT-debug", num_classes=3)
    path = tmp_path / f"three{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    main(debug_args(str(path), tmp_path / "out", "--steps", "2"))
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [0, 1, 2]
    err = run_error(debug_args(str(path), tmp_path / "bad", "--class-labels", "3"), capsys)
    assert "class label 3 is out of range: the model has 3 classes" in err


@pytest.mark.usefixtures("no_model_work")
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class-labels", "3", "10"], r"class label 10 is out of range: the model has 10 classes, ids in \[0, 10\)"),
        (["--class-labels", "-1"], r"class label -1 is out of range"),
        (["--class-labels", "tench"], r"class name 'tench' needs an ImageNet model \(1000 classes\)"),
        (
            ["--num-classes", "1000", "--class-labels", "golden retreiver"],
            r"unknown ImageNet class name 'golden retreiver'; did you mean 'golden retriever' \(207\)",
        ),
        (["--cfg-scale", "0.5"], r"cfg scale 0.5 is out of range: it must be >= 1"),
        (["--steps", "0"], r"number of sampling steps 0 is out of range: choose an integer in \[1, 1000\]"),
        (["--steps", "1001"], r"number of sampling steps 1001 is out of range"),
        (
            ["--sampler", "ddim", "--steps", "300"],
            r"no integer stride gives exactly 300 of 1000 steps; nearest: ddim250 or ddim334",
        ),
        (["--image-size", "60"], r"image size 60 must be a positive multiple of 16"),
        (["--per-proc-batch-size", "0"], r"--per-proc-batch-size 0 must be >= 1"),
        (["--seed", "-1"], r"--seed -1 must be >= 0"),
        (["--fid-samples", "4", "--class-labels", "1"], r"--class-labels cannot be combined with --fid-samples"),
        (["--fid-samples", "0"], r"--fid-samples 0 must be >= 1"),
        (["--device", "cpu", "--cuda-graph"], r"--cuda-graph needs a CUDA device, not cpu"),
        (["--random-weights"], r"--ckpt and --random-weights exclude each other"),
    ],
)
def test_bad_input_fails_before_model_work(checkpoint, tmp_path, capsys, extra, message):
    err = run_error(debug_args(checkpoint, tmp_path, *extra), capsys)
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "samples.png")


@pytest.mark.usefixtures("no_model_work")
def test_checkpoint_arguments_fail_before_model_work(tmp_path, capsys):
    err = run_error(["--model", "DiT-debug", "--no-vae"], capsys)
    assert "no checkpoint: pass --ckpt PATH" in err and "--random-weights" in err
    err = run_error(["--model", "DiT-debug", "--no-vae", "--ckpt", str(tmp_path / "missing.pt")], capsys)
    assert "missing.pt' does not exist" in err
    err = run_error(["--model", "DiT-debug", "--no-vae", "--ckpt", str(tmp_path)], capsys)
    assert "is a directory (a sharded training checkpoint?)" in err and "python -m dit_fast.export --ckpt" in err


@pytest.mark.usefixtures("no_model_work")
def test_missing_vae_pieces_fail_before_model_work(checkpoint, tmp_path, capsys, monkeypatch):
    args = [
        "--model",
        "DiT-debug",
        "--ckpt",
        checkpoint,
        "--out",
        str(tmp_path),
        "--vae",
        str(tmp_path / "no-vae-here"),
    ]
    if HAS_DIFFUSERS:
        err = run_error(args, capsys)
        assert "VAE directory" in err and "does not exist; pass --vae DIR" in err and "--no-vae" in err
    monkeypatch.setitem(sys.modules, "diffusers", None)
    err = run_error(args, capsys)
    assert "needs diffusers, which is not installed: pip install 'dit_fast[vae]' (or `pip install diffusers`)" in err
    assert "pass --no-vae" in err


def test_checkpoint_mismatches_are_clean_errors(checkpoint, tmp_path, capsys):
    err = run_error(["--model", "DiT-debug", "--ckpt", checkpoint, "--no-vae", "--image-size", "128"], capsys)
    assert "image size 128 does not match the checkpoint" in err and "implies 64px" in err
    err = run_error(["--model", "DiT-S/2", "--ckpt", checkpoint, "--no-vae", "--out", str(tmp_path)], capsys)
    assert "does not fit DiT-S/2" in err and "looks like DiT-debug" in err


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install diffusers)")
def test_decodes_with_a_local_vae(checkpoint, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    main(["--model", "DiT-debug", "--ckpt", checkpoint, "--vae", str(tmp_path / "vae"), "--steps", "3",
          "--no-progress", "--class-labels", "4", "--out", str(out)])  # fmt: skip
    assert sorted(os.listdir(out)) == ["000_4.png", "samples.png"]
    assert Image.open(out / "000_4.png").size == (64, 64)


# ---- FID sample sets --------------------------------------------------------------------------------------


def fid_args(checkpoint: str, out, count: int, *extra: str) -> list[str]:
    return ["--model", "DiT-debug", "--ckpt", checkpoint, "--no-vae", "--steps", "4", "--no-progress",
            "--out", str(out), "--fid-samples", str(count), "--cfg-scale", "1.5", *extra]  # fmt: skip


def load_npz(out, count: int) -> np.ndarray:
    with np.load(os.path.join(out, f"samples_{count}x64x64x3.npz")) as archive:
        assert archive.files == ["arr_0"]
        return archive["arr_0"]


def test_fid_samples_pngs_and_npz(checkpoint, tmp_path):
    main(fid_args(checkpoint, tmp_path, 7, "--per-proc-batch-size", "3"))
    pngs = sorted(name for name in os.listdir(tmp_path) if name.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    images = load_npz(tmp_path, 7)
    assert images.shape == (7, 64, 64, 3) and images.dtype == np.uint8
    for index in (0, 6):
        np.testing.assert_array_equal(images[index], np.asarray(Image.open(tmp_path / f"{index:06d}.png")))
    assert len({image.tobytes() for image in images}) == 7


def test_fid_resume_keeps_present_images_and_makes_the_same_ones(checkpoint, tmp_path, monkeypatch):
    main(fid_args(checkpoint, tmp_path / "whole", 7, "--per-proc-batch-size", "4"))
    whole = load_npz(tmp_path / "whole", 7)
    saved = []
    original_save = dit_fast.sample.save_png_atomically

    def recording_save(image, path):
        saved.append(path)
        original_save(image, path)

    monkeypatch.setattr(dit_fast.sample, "save_png_atomically", recording_save)
    main(fid_args(checkpoint, tmp_path / "resumed", 3, "--per-proc-batch-size", "2"))  # "interrupted" after 3
    main(fid_args(checkpoint, tmp_path / "resumed", 7, "--per-proc-batch-size", "4"))
    assert [os.path.basename(path) for path in saved] == [f"{i:06d}.png" for i in (0, 1, 2, 3, 4, 5, 6)]
    for index in (1, 5):
        os.remove(tmp_path / "resumed" / f"{index:06d}.png")
    saved.clear()
    main(fid_args(checkpoint, tmp_path / "resumed", 7, "--per-proc-batch-size", "4"))
    assert sorted(os.path.basename(path) for path in saved) == ["000001.png", "000005.png"]
    resumed = load_npz(tmp_path / "resumed", 7)
    # same labels and noise per index; other batch compositions may round a pixel differently
    assert np.abs(resumed.astype(int) - whole.astype(int)).max() <= 1
    assert (resumed == whole).mean() > 0.999


def test_fid_resume_refuses_other_settings(checkpoint, tmp_path, capsys):
    main(fid_args(checkpoint, tmp_path, 2))
    err = run_error(fid_args(checkpoint, tmp_path, 2, "--seed", "3"), capsys)
    assert "holds FID samples made with other settings (seed: 0 there, 3 now)" in err


def test_fid_two_processes_with_torchrun(checkpoint, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = fid_args(checkpoint, tmp_path / "two", 5, "--per-proc-batch-size", "2")
    command = [*torchrun, os.path.join(REPO, "sample.py"), *args]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 to make on 2 process(es)" in result.stdout
    main(fid_args(checkpoint, tmp_path / "one", 5, "--per-proc-batch-size", "2"))
    two, one = load_npz(tmp_path / "two", 5), load_npz(tmp_path / "one", 5)
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1 and (two == one).mean() > 0.999
