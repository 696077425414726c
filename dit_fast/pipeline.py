"""The sampling API: class labels (ids or ImageNet names) in, images out, like diffusers' DiTPipeline.

    pipe = Pipeline.from_checkpoint("DiT-XL-2-256x256.pt", model="DiT-XL/2", vae="sd-vae-ft-ema/")
    images = pipe(class_labels=[207, "otter"], guidance_scale=4.0, num_inference_steps=250)  # PIL images

sample.py drives this same class (interactive grids and FID sample sets), so there is one sampling loop:
dit_fast.diffusion.fast_sampling.SamplerLoop. Noise is drawn here, before the loop, from one generator
or from one generator per image; with per-image generators an image depends only on its own seed.
"""

import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dit_fast.checkpoint import load_model
from dit_fast.classes import resolve_class_labels
from dit_fast.diffusion.fast_sampling import (
    PRECISIONS,
    SamplerLoop,
    check_sampling_options,
    num_step_noises,
    sampler_diffusion,
)
from dit_fast.images import to_uint8
from dit_fast.model import DiT, create_model
from dit_fast.vae import DEFAULT_VAE, VAE

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_BATCH_SIZE = 64

Generators = torch.Generator | Sequence[torch.Generator] | None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA (DiT's sampling is insensitive to it); fp32 on the CPU, where bf16 is slow."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_fused(fused: bool | None, device: torch.device, precision: str) -> bool:
    """None means the fast path (Triton kernels, bf16 weights) exactly when sampling in bf16 on CUDA."""
    if fused is None:
        return torch.device(device).type == "cuda" and precision == "bf16"
    return fused


def fast_weights_dtype(fused: bool, precision: str) -> torch.dtype | None:
    """The fast path computes in its parameters' dtype, so bf16 sampling casts its weights; else keep them."""
    return torch.bfloat16 if fused and precision == "bf16" else None


def build_model(
    name: str,
    ckpt: str | None,
    image_size: int | None = None,
    block: str = "adaLN-Zero",
    num_classes: int | None = None,
    attn: str = "auto",
    fused: bool = False,
) -> DiT:
    """A DiT from a checkpoint file (official, export, or the EMA of a single-file training checkpoint), or
    with random weights when ckpt is None; fused=True builds the fast path (same parameters)."""
    kwargs = {"attn": attn, "fused": fused}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ckpt is None:
        return create_model(name, image_size=image_size, block=block, **kwargs)
    return load_model(name, ckpt, image_size=image_size, block=block, **kwargs)


def index_seed(seed: int, index: int) -> int:
    """A 64-bit seed for sample `index` of run `seed`: images are independent of batching, ranks and resumes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def index_generators(seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample index, on the device the noise is drawn on."""
    return [torch.Generator(device).manual_seed(index_seed(seed, index)) for index in indices]


def uniform_labels(seed: int, indices: Sequence[int], num_classes: int) -> list[int]:
    """Class labels uniform over [0, num_classes), a function of (seed, index) alone (FID sample sets)."""
    return [int(np.random.default_rng([seed, index, num_classes]).integers(num_classes)) for index in indices]


def draw_noise(
    generator: Generators, n: int, latent_shape: tuple[int, ...], step_noises: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x_T (N, C, h, w) and the per-step noise (N, S, C, h, w) (None when S is 0), moved to `device`.

    A single generator (or None: the global RNG on `device`) draws the whole batch; a list draws image i
    from generator i, x_T first, then its S step noises.
    """
    if isinstance(generator, Sequence):
        images = [
            torch.randn(1 + step_noises, *latent_shape, generator=g, device=g.device) for g in generator
        ]  # N x (1 + S, C, h, w)
        noise = torch.stack(images).to(device)  # (N, 1 + S, C, h, w)
        return noise[:, 0].contiguous(), (noise[:, 1:].contiguous() if step_noises else None)
    source = generator.device if generator is not None else device
    x_T = torch.randn(n, *latent_shape, generator=generator, device=source).to(device)
    if not step_noises:
        return x_T, None
    return x_T, torch.randn(n, step_noises, *latent_shape, generator=generator, device=source).to(device)


class Pipeline:
    """Class-conditional DiT sampling with classifier-free guidance and an optional VAE decoder.

    precision: "bf16" (default on CUDA: autocast for the reference model; the fused model, which computes in
    its weights' dtype, gets bf16 weights), "tf32" or "fp32" (default on the CPU). cuda_graph (default on
    CUDA) captures the whole sampler step; compile puts the model under torch.compile. The model is moved to
    `device` (and cast) in place.
    """

    def __init__(
        self,
        model: DiT,
        vae: VAE | None = None,
        device: torch.device | str | None = None,
        precision: str | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = precision or default_precision(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, not {self.device}")
        self.compile = compile
        weights_dtype = fast_weights_dtype(model.fused, self.precision)
        self.model = model.to(device=self.device, dtype=weights_dtype).eval().requires_grad_(False)
        self.vae = vae
        self.num_classes = model.num_classes
        self.latent_shape = (model.in_channels, model.cfg.input_size, model.cfg.input_size)
        self._loop: SamplerLoop | None = None
        self._loop_key: tuple | None = None
        self.timings: dict[str, float] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | None,
        model: str = "DiT-XL/2",
        vae: str | VAE | None = DEFAULT_VAE,
        image_size: int | None = None,
        block: str = "adaLN-Zero",
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        precision: str | None = None,
        fused: bool | None = None,
        attn: str = "auto",
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> "Pipeline":
        """Load `model` from a checkpoint file (None: random weights) and the VAE (a directory, a hub id or a
        loaded VAE; None to sample latents only). fused None takes the fast path when available (CUDA, bf16)."""
        device = torch.device(device) if device is not None else default_device()
        precision = precision or default_precision(device)
        fused = resolve_fused(fused, device, precision)
        autoencoder = VAE.from_pretrained(vae, device) if isinstance(vae, str) else vae
        dit = build_model(model, path, image_size, block, num_classes, attn, fused)
        return cls(dit, autoencoder, device, precision, cuda_graph, compile)

    def sampler_loop(self, sampler: str, num_steps: int, cfg_scale: float, cfg_channels: int | str) -> SamplerLoop:
        """The loop for these settings, kept while they stay the same (so its CUDA graph is reused)."""
        key = (sampler, num_steps, float(cfg_scale), cfg_channels)
        if self._loop_key != key:
            self._loop = None  # frees the previous graph and buffers first
            self._loop = SamplerLoop(
                self.model, sampler, num_steps, cfg_scale, cfg_channels, self.precision, self.cuda_graph, self.compile
            )
            self._loop_key = key
        return self._loop

    def check_call(
        self,
        class_labels: Sequence[int | str],
        guidance_scale: float,
        num_inference_steps: int,
        sampler: str,
        cfg_channels: int | str,
        output_type: str,
    ) -> list[int]:
        """Validate a call without running anything; returns the class ids."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                f"output_type {output_type!r} needs a VAE; this pipeline has none (vae=None): use 'latent'"
            )
        check_sampling_options(sampler, num_inference_steps, guidance_scale, cfg_channels, self.precision)
        sampler_diffusion(sampler, num_inference_steps)  # DDIM step counts with no integer stride fail here
        return resolve_class_labels(list(class_labels), self.num_classes)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str],
        guidance_scale: float = 4.0,
        num_inference_steps: int = 250,
        generator: Generators = None,
        sampler: str = "ddpm",
        cfg_channels: int | str = 3,
        output_type: str = "pil",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = True,
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Sample one image per label. output_type: "pil" (list of PIL images), "np" ((N, H, W, 3) uint8),
        "pt" ((N, 3, H, W) float in [-1, 1]), "latent" ((N, 4, h, w) float32 DiT latents, before the VAE).

        generator: one torch.Generator for the whole call, or one per label (an image then depends only on
        its own generator, whatever the batching). Batches of batch_size labels run one after another.
        """
        labels = self.check_call(class_labels, guidance_scale, num_inference_steps, sampler, cfg_channels, output_type)
        if isinstance(generator, Sequence) and len(generator) != len(labels):
            raise ValueError(
                f"got {len(generator)} generators for {len(labels)} class labels; pass one per label or one in all"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r} must be >= 1")
        loop = self.sampler_loop(sampler, num_inference_steps, guidance_scale, cfg_channels)
        step_noises = num_step_noises(sampler, num_inference_steps)
        outputs, sampling_s, decode_s = [], 0.0, 0.0
        for start in range(0, len(labels), batch_size):
            chunk = labels[start : start + batch_size]
            chunk_generator = generator[start : start + batch_size] if isinstance(generator, Sequence) else generator
            x_T, step_noise = draw_noise(chunk_generator, len(chunk), self.latent_shape, step_noises, self.device)
            y = torch.tensor(chunk, device=self.device)  # (n,)
            began = time.perf_counter()
            latents = loop.run(x_T, y, step_noise, progress)  # (n, C, h, w)
            self._synchronize()
            sampling_s += time.perf_counter() - began
            if output_type == "latent":
                outputs.append(latents)
                continue
            began = time.perf_counter()
            images = self.vae.decode(latents)  # (n, 3, H, W) in [-1, 1]
            self._synchronize()
            decode_s += time.perf_counter() - began
            outputs.append(images if output_type == "pt" else to_uint8(images))
        self.timings = {
            "images": len(labels),
            "steps": num_inference_steps,
            "sampling_s": sampling_s,
            "decode_s": decode_s,
        }
        if output_type in ("latent", "pt"):
            return torch.cat(outputs)
        pixels = np.concatenate(outputs)  # (N, H, W, 3) uint8
        return pixels if output_type == "np" else [Image.fromarray(image) for image in pixels]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
