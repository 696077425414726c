"""Fréchet Inception Distance between two image sets, with Inception weights you supply as a file.

    python -m dit_fast.fid samples/samples_50000x256x256x3.npz reference.npz --inception-weights inception-2015-12-05.pt

A and B are .npz files (`arr_0`: (N, H, W, 3) uint8, the format sample.py --fid-samples and ADM's suite
use) or folders of images. Features come from the FID Inception network (the TF 2015-12-05 graph's
2048-d pool features), loaded from a local file, because nothing here downloads:
  * NVIDIA's TorchScript port `inception-2015-12-05.pt` (StyleGAN2-ADA, clean-fid): needs nothing else;
  * torch-fidelity's `pt_inception-2015-12-05-6726825d.pth` (also what torchmetrics' FID loads): needs
    `pip install torch-fidelity`.
The statistics (float64, streamed) and the distance are computed here; the extractor is any module that
maps uint8 (N, 3, H, W) images to (N, D) features, so tests plug in a tiny network.

FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the square root uses
scipy.linalg.sqrtm when scipy is installed (as pytorch-fid and ADM's evaluator do), else the symmetric
form tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which has the same eigenvalues and needs only eigh.
"""

import argparse
import importlib.util
import os
import zipfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SQRTM_METHODS = ("auto", "scipy", "eigh")
WEIGHTS_HINT = (
    "NVIDIA's TorchScript Inception inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid; needs nothing else) or "
    "torch-fidelity's pt_inception-2015-12-05-6726825d.pth (needs `pip install torch-fidelity`)"
)
SINGULAR_OFFSET = 1e-6


# ---- the distance ---------------------------------------------------------------------------------------


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigh (negative round-off clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray, method: str = "auto") -> float:
    """tr((S_a S_b)^(1/2)) for covariance matrices S_a, S_b (D, D)."""
    if method not in SQRTM_METHODS:
        raise ValueError(f"unknown sqrtm method {method!r}; choose one of {', '.join(SQRTM_METHODS)}")
    if method == "auto":
        method = "scipy" if importlib.util.find_spec("scipy") is not None else "eigh"
    if method == "eigh":
        root_a = _sqrt_psd(sigma_a)
        middle = root_a @ sigma_b @ root_a  # (D, D) symmetric PSD, the eigenvalues of S_a S_b
        return float(np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum())
    import scipy.linalg

    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():  # a singular product: offset both diagonals, as pytorch-fid does
        offset = np.eye(len(sigma_a)) * SINGULAR_OFFSET
        root = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    return float(np.trace(root).real)


def frechet_distance(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, method: str = "auto"
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu_a, S_a) and N(mu_b, S_b); inputs in float64."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(
            f"shapes do not fit: mu {mu_a.shape} / {mu_b.shape}, sigma {sigma_a.shape} / {sigma_b.shape}; "
            "expected (D,) and (D, D) for both sets"
        )
    difference = mu_a - mu_b
    trace_root = trace_sqrt_product(sigma_a, sigma_b, method)
    return float(difference @ difference + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


# ---- statistics of features -----------------------------------------------------------------------------


class FeatureStatistics:
    """Running mean and covariance of (N, D) features in float64, without keeping the features.

    Sums are taken around a shift (the first batch's mean), which keeps the one-pass covariance accurate.
    """

    def __init__(self):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | None = None  # (D,)
        self.outer: torch.Tensor | None = None  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().double().flatten(1)  # (n, D)
        if self.shift is None:
            self.shift = features.mean(dim=0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64, device=features.device)
        centred = features - self.shift  # (n, D)
        self.total += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.count += len(features)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,) and the unbiased covariance (D, D), as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        centred_mean = self.total / self.count  # (D,)
        covariance = (self.outer - self.count * torch.outer(centred_mean, centred_mean)) / (self.count - 1)
        return (centred_mean + self.shift).cpu().numpy(), covariance.cpu().numpy()


# ---- image sources --------------------------------------------------------------------------------------


def _npz_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """(n, H, W, 3) uint8 batches of an .npz's arr_0, read from the archive without loading it whole."""
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise ValueError(
                f"{path!r} has no arr_0 (found {', '.join(archive.namelist())}); expected (N, H, W, 3) uint8 images"
            )
        with archive.open("arr_0.npy") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(stream)
            if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"{path!r}: arr_0 is {dtype} {shape}; expected C-ordered (N, H, W, 3) uint8 images")
            image_bytes = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = bytearray(stream.read(count * image_bytes))  # writable, so torch.from_numpy takes it as is
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def _folder_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """(n, H, W, 3) uint8 batches of a folder's images, in sorted name order; all must share one size."""
    names = sorted(name for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    first_shape = None
    for start in range(0, len(names), batch_size):
        images = []
        for name in names[start : start + batch_size]:
            with Image.open(os.path.join(path, name)) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
            first_shape = first_shape or pixels.shape
            if pixels.shape != first_shape:
                raise ValueError(f"{name} in {path!r} is {pixels.shape[1]}x{pixels.shape[0]}, unlike the first image")
            images.append(pixels)
        yield np.stack(images)


def image_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """(n, H, W, 3) uint8 batches of an .npz file or an image folder."""
    if os.path.isdir(path):
        return _folder_batches(path, batch_size)
    if os.path.isfile(path) and path.endswith(".npz"):
        return _npz_batches(path, batch_size)
    raise FileNotFoundError(f"{path!r} is neither an .npz file nor a folder of images")


@torch.no_grad()
def feature_statistics(
    path: str, extractor: nn.Module, batch_size: int = 100, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu (D,), sigma (D, D), number of images) of extractor features over the images at `path`."""
    statistics = FeatureStatistics()
    for batch in image_batches(path, batch_size):
        images = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
        statistics.update(extractor(images))  # (n, D)
    mu, sigma = statistics.mean_and_covariance()
    return mu, sigma, statistics.count


# ---- Inception from a local file ------------------------------------------------------------------------


class TorchScriptInception(nn.Module):
    """NVIDIA's TorchScript FID Inception: uint8 (N, 3, H, W), resized to 299 inside -> (N, 2048) pool features."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images, return_features=True).view(len(images), -1)  # (N, 2048)


class FidelityInception(nn.Module):
    """torch-fidelity's FID Inception ("inception-v3-compat"): uint8 (N, 3, H, W) -> (N, 2048) pool features."""

    def __init__(self, weights_path: str):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ImportError(
                f"{weights_path!r} is not a TorchScript archive, so it is read as torch-fidelity's Inception weights, "
                "which needs torch-fidelity: `pip install torch-fidelity` (or `pip install 'torchmetrics[image]'`); "
                "or pass NVIDIA's TorchScript inception-2015-12-05.pt, which needs nothing else"
            ) from error
        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[0].view(len(images), -1)  # (N, 2048)


def is_torchscript_archive(path: str) -> bool:
    """TorchScript archives hold constants.pkl and code/; torch.save state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_inception(weights_path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The FID Inception from a local weights file (see the module docstring for the accepted files)."""
    if not weights_path or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"Inception weights {weights_path!r} not found; FID downloads nothing, so pass --inception-weights PATH "
            f"with {WEIGHTS_HINT}"
        )
    if is_torchscript_archive(weights_path):
        extractor = TorchScriptInception(torch.jit.load(weights_path, map_location=device))
    else:
        extractor = FidelityInception(weights_path)
    return extractor.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dit_fast.fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help=".npz (arr_0: N x H x W x 3 uint8) or a folder of images")
    parser.add_argument("b", help=".npz or a folder of images")
    parser.add_argument("--inception-weights", required=True, metavar="PATH", help=WEIGHTS_HINT)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sqrtm", default="auto", choices=SQRTM_METHODS, help="matrix square root: scipy if installed, else eigh"
    )
    args = parser.parse_args(argv)
    try:
        for path in (args.a, args.b):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path!r} does not exist; pass an .npz file or a folder of images")
        extractor = load_inception(args.inception_weights, args.device)
        mu_a, sigma_a, count_a = feature_statistics(args.a, extractor, args.batch_size, args.device)
        mu_b, sigma_b, count_b = feature_statistics(args.b, extractor, args.batch_size, args.device)
        fid = frechet_distance(mu_a, sigma_a, mu_b, sigma_b, args.sqrtm)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"FID {fid:.4f} ({count_a} images in {args.a}, {count_b} in {args.b})")


if __name__ == "__main__":
    main()
