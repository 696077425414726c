"""FID: the Fréchet distance against closed forms, streamed statistics, .npz and folder inputs, a pluggable
extractor (a tiny random conv net), agreement with torchmetrics, and the CLI's errors."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dit_fast.fid import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    is_torchscript_archive,
    load_inception,
    main,
    trace_sqrt_product,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None
HAS_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


class TinyFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 8): a random conv, ReLU and global average pool; any image size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))  # (N, 8)


class ScriptedFeatures(TinyFeatures):
    """TinyFeatures with the calling convention of NVIDIA's TorchScript Inception: forward(images, return_features)."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.relu(self.conv(images.float() / 127.5 - 1)).mean(dim=(2, 3))  # (N, 8)
        return features if return_features else features.sum(dim=1)


def rotated_gaussians(dim: int = 6, seed: int = 0):
    """Two Gaussians whose covariances Q D Q^T share eigenvectors: FID = |dmu|^2 + sum (sqrt d_a - sqrt d_b)^2."""
    rng = np.random.default_rng(seed)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    d_a, d_b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    closed_form = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(d_a) - np.sqrt(d_b)) ** 2).sum()
    return mu_a, q @ np.diag(d_a) @ q.T, mu_b, q @ np.diag(d_b) @ q.T, closed_form


def random_images(count: int, seed: int, side: int = 32, brightness: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, size=(count, side, side, 3)).astype(np.uint8) + np.uint8(brightness)


@pytest.mark.parametrize(
    "method", ["eigh", pytest.param("scipy", marks=pytest.mark.skipif(not HAS_SCIPY, reason="no scipy"))]
)
def test_frechet_distance_closed_forms(method):
    mu_a, sigma_a, mu_b, sigma_b, closed_form = rotated_gaussians()
    assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method) == pytest.approx(closed_form, rel=1e-9)
    diagonal_a, diagonal_b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    # |(1, 0, 0)|^2 + (1 - 2)^2 + (2 - 2)^2 + (3 - 1)^2 = 1 + 1 + 0 + 4
    assert frechet_distance([1.0, 0, 0], diagonal_a, [0.0, 0, 0], diagonal_b, method) == pytest.approx(6.0, rel=1e-12)
    assert frechet_distance(mu_a, sigma_a, mu_a, sigma_a, method) == pytest.approx(0.0, abs=1e-9)


def test_trace_sqrt_product_of_non_commuting_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma_a, sigma_b = a @ a.T, b @ b.T
    eigenvalues = np.linalg.eigvals(sigma_a @ sigma_b)  # real and positive, though the product is not symmetric
    assert trace_sqrt_product(sigma_a, sigma_b, "eigh") == pytest.approx(np.sqrt(eigenvalues.real).sum(), rel=1e-9)
    with pytest.raises(ValueError, match="unknown sqrtm method 'svd'"):
        trace_sqrt_product(sigma_a, sigma_b, "svd")


def test_frechet_distance_checks_shapes():
    with pytest.raises(ValueError, match="shapes do not fit"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streamed_statistics_equal_numpy():
    features = np.random.default_rng(2).normal(loc=5.0, size=(50, 4))
    statistics = FeatureStatistics()
    for chunk in np.array_split(features, 7):
        statistics.update(torch.from_numpy(chunk))
    mu, sigma = statistics.mean_and_covariance()
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureStatistics().mean_and_covariance()


def test_npz_and_folder_give_the_same_statistics(tmp_path):
    images = random_images(9, seed=3)
    np.savez(tmp_path / "set.npz", arr_0=images)
    (tmp_path / "folder").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "folder" / f"{index:06d}.png")
    extractor = TinyFeatures()
    mu_npz, sigma_npz, count_npz = feature_statistics(str(tmp_path / "set.npz"), extractor, batch_size=4)
    mu_dir, sigma_dir, count_dir = feature_statistics(str(tmp_path / "folder"), extractor, batch_size=5)
    assert count_npz == count_dir == 9
    np.testing.assert_allclose(mu_npz, mu_dir, rtol=1e-6)
    np.testing.assert_allclose(sigma_npz, sigma_dir, rtol=1e-5, atol=1e-9)


def test_npz_must_hold_uint8_images(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected C-ordered \\(N, H, W, 3\\) uint8 images"):
        feature_statistics(str(tmp_path / "floats.npz"), TinyFeatures())


@pytest.mark.skipif(not HAS_TORCHMETRICS, reason="torchmetrics is not installed")
def test_agrees_with_torchmetrics(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = random_images(40, seed=4), random_images(40, seed=5, brightness=40)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    extractor = TinyFeatures()
    mu_a, sigma_a, _ = feature_statistics(str(tmp_path / "real.npz"), extractor, batch_size=16)
    mu_b, sigma_b, _ = feature_statistics(str(tmp_path / "fake.npz"), extractor, batch_size=16)
    ours = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert ours > 1e-3
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


def test_cli_with_a_torchscript_extractor(tmp_path, capsys):
    scripted = torch.jit.script(ScriptedFeatures())
    scripted.save(str(tmp_path / "inception.pt"))
    assert is_torchscript_archive(str(tmp_path / "inception.pt"))
    np.savez(tmp_path / "a.npz", arr_0=random_images(12, seed=6))
    np.savez(tmp_path / "b.npz", arr_0=random_images(12, seed=7, brightness=30))
    main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception-weights", str(tmp_path / "inception.pt"),
          "--batch-size", "5"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "(12 images in" in out
    mu, sigma, _ = feature_statistics(str(tmp_path / "a.npz"), TinyFeatures())
    extracted = load_inception(str(tmp_path / "inception.pt"))
    mu_scripted, _, _ = feature_statistics(str(tmp_path / "a.npz"), extracted)
    np.testing.assert_allclose(mu_scripted, mu, rtol=1e-6)


def test_cli_missing_weights_is_a_clear_error(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", arr_0=random_images(3, seed=8))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--inception-weights", str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: Inception weights" in err and "missing.pt' not found; FID downloads nothing" in err
    assert "inception-2015-12-05.pt" in err and "pip install torch-fidelity" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere.npz"), str(tmp_path / "a.npz"), "--inception-weights", str(tmp_path / "x.pt")])
    assert "nowhere.npz' does not exist" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TORCH_FIDELITY, reason="torch-fidelity is installed, so a state-dict file loads")
def test_state_dict_weights_without_torch_fidelity_say_what_to_install(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "pt_inception.pth")
    with pytest.raises(ImportError, match=r"needs torch-fidelity: `pip install torch-fidelity`"):
        load_inception(str(tmp_path / "pt_inception.pth"))
