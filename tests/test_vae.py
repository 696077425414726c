"""The VAE wrapper: decoding with a tiny AutoencoderKL saved locally, and the errors for missing pieces."""

import importlib.util
import sys

import pytest
import torch

from dit_fast.vae import LATENT_SCALE, SD_VAE_CONFIG, VAE, check_vae_source

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install diffusers)")


def tiny_vae() -> VAE:
    """An AutoencoderKL with SD's 8x downsampling and 4 latent channels, 32 channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    return VAE(autoencoder)


@pytest.fixture
def tiny_vae_dir(tmp_path):
    """tiny_vae() saved as a diffusers directory."""
    tiny_vae().autoencoder.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@needs_diffusers
def test_decode_divides_by_the_latent_scale(tiny_vae_dir):
    from diffusers import AutoencoderKL

    vae = VAE.from_pretrained(str(tiny_vae_dir))
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = vae.decode(latents, batch_size=2)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        expected = reference.decode(latents / LATENT_SCALE).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


@needs_diffusers
def test_encode_gives_the_scaled_posterior(tiny_vae_dir):
    from diffusers import AutoencoderKL

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = VAE.from_pretrained(str(tiny_vae_dir)).encode(images, batch_size=2)
    assert mean.shape == std.shape == (3, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(tiny_vae_dir).eval().encode(images).latent_dist
    torch.testing.assert_close(mean, posterior.mean * LATENT_SCALE, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, posterior.std * LATENT_SCALE, rtol=1e-4, atol=1e-6)
    assert (std > 0).all()


@needs_diffusers
def test_bf16_decode_close_to_fp32(tiny_vae_dir):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fp32 = VAE.from_pretrained(str(tiny_vae_dir)).decode(latents)
    bf16 = VAE.from_pretrained(str(tiny_vae_dir), dtype=torch.bfloat16).decode(latents)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.1


def test_missing_diffusers_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(
        ImportError,
        match=r"needs diffusers, which is not installed: pip install 'dit_fast\[vae\]' "
        r"\(or `pip install diffusers`\), or pass --no-vae",
    ):
        check_vae_source(str(tmp_path), "--vae DIR", "pass --no-vae")


@needs_diffusers
def test_missing_directory_says_what_to_pass(tmp_path):
    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(
        FileNotFoundError,
        match=r"VAE directory '.*no-such-vae' does not exist; pass --vae DIR with a "
        r"diffusers AutoencoderKL directory .*hf download stabilityai/sd-vae-ft-ema"
        r".*or pass --no-vae",
    ):
        VAE.from_pretrained(missing, option="--vae DIR", alternative="pass --no-vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        VAE.from_pretrained(str(tmp_path / "empty"))


@needs_diffusers
def test_unreachable_hub_id_says_what_to_pass(monkeypatch):
    from diffusers import AutoencoderKL

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"could not load the VAE 'stabilityai/sd-vae-ft-ema' \(We couldn't "
        r"connect.*\); pass vae=<directory> with a local diffusers",
    ):
        VAE.from_pretrained("stabilityai/sd-vae-ft-ema")


@needs_diffusers
def test_sd_config_builds_the_kl_f8_architecture():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        autoencoder = AutoencoderKL(**SD_VAE_CONFIG)
    assert sum(p.numel() for p in autoencoder.parameters()) == 83_653_863
    assert autoencoder.config.scaling_factor == LATENT_SCALE
