"""DiT model configurations: the paper's 12 sizes (S/B/L/XL x patch 2/4/8) and a tiny debug model."""
from dataclasses import dataclass, replace

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")
IMAGE_SIZES = (256, 512)
VAE_DOWNSAMPLE = 8


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one DiT; `input_size` is the latent side (image side / 8)."""

    name: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    in_channels: int = 4
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    input_size: int = 32
    block: str = "adaLN-Zero"

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_CONFIGS = {
    f"DiT-{size}/{patch}": DiTConfig(f"DiT-{size}/{patch}", depth, width, heads, patch)
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
DIT_CONFIGS["DiT-debug"] = DiTConfig(
    "DiT-debug", depth=2, hidden_size=64, num_heads=4, patch_size=2, num_classes=10, input_size=8
)


def image_size_to_input_size(image_size: int, patch_size: int) -> int:
    """Latent side for an image side; the image must split into whole VAE cells and whole patches."""
    if not isinstance(image_size, int) or image_size <= 0 or image_size % (VAE_DOWNSAMPLE * patch_size):
        raise ValueError(
            f"image size {image_size!r} must be a positive multiple of {VAE_DOWNSAMPLE * patch_size} "
            f"(8 x patch size {patch_size}); the official checkpoints use {' or '.join(map(str, IMAGE_SIZES))}"
        )
    return image_size // VAE_DOWNSAMPLE


def get_config(name: str, image_size: int | None = None, block: str = "adaLN-Zero", **overrides) -> DiTConfig:
    """Look up a config by name; `image_size` sets the latent side, `overrides` any other field."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DIT_CONFIGS)}")
    if block not in BLOCK_TYPES:
        raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCK_TYPES)}")
    cfg = DIT_CONFIGS[name]
    if image_size is not None:
        overrides["input_size"] = image_size_to_input_size(image_size, cfg.patch_size)
    return replace(cfg, block=block, **overrides)
