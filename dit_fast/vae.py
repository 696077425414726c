"""Stable Diffusion's KL-f8 VAE (a diffusers AutoencoderKL): DiT samples latents, this turns them into images.

DiT trains on the VAE posterior times LATENT_SCALE = 0.18215, so latents are divided by it before decoding.
diffusers is an optional dependency (the `vae` extra); weights come from a local directory or a hub id.
"""

import os

import torch

LATENT_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
INSTALL_HINT = "pip install 'dit_fast[vae]' (or `pip install diffusers`)"
DOWNLOAD_HINT = f"`hf download {DEFAULT_VAE} --local-dir sd-vae-ft-ema` on a machine with network"
# The architecture of stabilityai/sd-vae-ft-ema / -mse (SD KL-f8): 83.7M parameters, 8x downsampling.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 256,
}
DECODE_BATCH_SIZE = 32  # images per VAE call, for encode and decode alike


def autoencoder_kl_class(alternative: str = "pass vae=None for latents only") -> type:
    """diffusers.AutoencoderKL, or an ImportError that says what to install and what to do instead."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(
            f"decoding latents needs diffusers, which is not installed: {INSTALL_HINT}, or {alternative}"
        ) from error
    return AutoencoderKL


def looks_like_local_path(source: str) -> bool:
    """True for what can only be a path (exists, absolute, ./ or ~, more than one '/'); hub ids are 'org/name'."""
    return (
        os.path.exists(source)
        or os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or os.sep != "/"
        and os.sep in source
    )


def check_vae_source(
    source: str, option: str = "vae=<directory>", alternative: str = "pass vae=None for latents only"
) -> None:
    """Fail early, before any sampling, when diffusers is missing or a local VAE directory is not usable."""
    autoencoder_kl_class(alternative)
    if not looks_like_local_path(source):
        return  # a hub id: whether it can be fetched is only known when loading
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"VAE directory {source!r} does not exist; pass {option} with a diffusers AutoencoderKL directory "
            f"(config.json + weights, e.g. {DOWNLOAD_HINT}), or {alternative}"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"VAE directory {source!r} has no config.json, so it is not a diffusers AutoencoderKL directory; "
            f"pass {option} "
            f"with one (e.g. {DOWNLOAD_HINT}), or {alternative}"
        )


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the SD VAE decodes well in bf16, unlike fp16), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class VAE:
    """An AutoencoderKL in DiT's latent units: decode (N, 4, h, w) latents into (N, 3, 8h, 8w) images in [-1, 1],
    encode images into the posterior (mean, std) that training latents are drawn from."""

    def __init__(
        self, autoencoder: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ):
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        if next(autoencoder.parameters()).dtype != self.dtype:
            autoencoder = autoencoder.to(dtype=self.dtype)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        option: str = "vae=<directory>",
        alternative: str = "pass vae=None for latents only",
    ) -> "VAE":
        """Load an AutoencoderKL from a local directory or a hub id (e.g. "stabilityai/sd-vae-ft-ema").

        `option` and `alternative` word the error for the caller (the CLI says --vae DIR / --no-vae).
        """
        check_vae_source(source, option, alternative)
        autoencoder_kl = autoencoder_kl_class(alternative)
        dtype = dtype or default_dtype(torch.device(device))
        try:
            autoencoder = autoencoder_kl.from_pretrained(os.path.expanduser(source), torch_dtype=dtype)
        except (OSError, ValueError) as error:  # no network, unknown hub id, missing weight files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise FileNotFoundError(
                f"could not load the VAE {source!r} ({reason}); pass {option} with a local diffusers AutoencoderKL "
                f"directory (config.json + weights, e.g. {DOWNLOAD_HINT}), or {alternative}"
            ) from error
        return cls(autoencoder, device, dtype)

    @classmethod
    def random_sd(cls, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> "VAE":
        """The SD KL-f8 architecture with random weights (no download): for benchmarks of decode time."""
        autoencoder_kl = autoencoder_kl_class()
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream untouched
            torch.manual_seed(seed)
            autoencoder = autoencoder_kl(**SD_VAE_CONFIG)
        return cls(autoencoder, device, dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = DECODE_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) images in [-1, 1] -> the posterior's mean and std, each (N, 4, H/8, W/8) float32, in DiT
        latent units (times LATENT_SCALE): a training latent is mean + std * N(0, I)."""
        means, stds = [], []
        for chunk in images.split(batch_size):
            posterior = self.autoencoder.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(posterior.mean.float() * LATENT_SCALE)  # (n, 4, h, w)
            stds.append(posterior.std.float() * LATENT_SCALE)  # (n, 4, h, w)
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = DECODE_BATCH_SIZE) -> torch.Tensor:
        """(N, 4, h, w) DiT latents -> (N, 3, 8h, 8w) float32 images in [-1, 1], decoded batch_size at a time."""
        images = []
        for chunk in latents.split(batch_size):
            scaled = chunk.to(self.device, self.dtype) / LATENT_SCALE  # (n, 4, h, w)
            images.append(self.autoencoder.decode(scaled).sample.float().clamp(-1, 1))  # (n, 3, 8h, 8w)
        return torch.cat(images)
