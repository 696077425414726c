"""One sampler step (guided denoiser + DDPM or DDIM update) over static buffers, eager or as a CUDA graph.

The step reads all it needs from buffers whose addresses never change -- the latents x, the labels y,
the per-step noise drawn beforehand, the descending step table and a step counter, all on the device --
and updates x and the counter in place. So one Python function is both the eager step (CPU, reference,
tests) and, captured once per batch shape, the CUDA graph replayed for every step: no host work, no
sync and no kernel-launch gaps between steps. The update arithmetic is GaussianDiffusion's own
(p_mean_variance for DDPM, ddim_sample with eta = 0 for DDIM); only the noise comes from the buffer.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import create_diffusion
from .gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim")
PRECISIONS = ("bf16", "tf32", "fp32")  # bf16 autocast; fp32 with TF32 matmuls; strict fp32
MAX_STEPS = 1000  # the length of DiT's diffusion process
GRAPH_WARMUP_STEPS = 3  # eager steps before capture: kernels load, autotuners and "auto" attention settle


def check_sampling_options(
    sampler: str, num_steps: int, cfg_scale: float, cfg_channels: int | str, precision: str
) -> None:
    """Raise a ValueError naming the bad value and the valid ones, before any model work."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(
            f"number of sampling steps {num_steps!r} is out of range: choose an integer in [1, {MAX_STEPS}]"
        )
    if not cfg_scale >= 1.0:
        raise ValueError(
            f"cfg scale {cfg_scale!r} is out of range: it must be >= 1 "
            "(1 disables guidance; DiT uses 1.5 for FID, 4.0 for visuals)"
        )
    if cfg_channels not in (3, "all"):
        raise ValueError(f"cfg channels {cfg_channels!r} is not valid; choose 3 (as the official DiT code) or 'all'")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def sampler_diffusion(sampler: str, num_steps: int) -> GaussianDiffusion:
    """DDPM respaced to num_steps ("250"), or DDIM at one integer stride ("ddim50"); raises if no stride fits."""
    return create_diffusion(str(num_steps) if sampler == "ddpm" else f"ddim{num_steps}")


def num_step_noises(sampler: str, num_steps: int) -> int:
    """How many per-step noise tensors a run draws: one per DDPM step, none for DDIM (eta = 0)."""
    return num_steps if sampler == "ddpm" else 0


@contextlib.contextmanager
def matmul_precision(precision: str):
    """fp32 matmuls in TF32 for "tf32", in full fp32 otherwise, restored afterwards (CUDA only reads it)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class GuidedDenoiser:
    """The model's output for N latents under classifier-free guidance: it sees [x; x] with labels [y; null].

    cfg_scale 1 skips the unconditional half (guidance would be the identity), as DiT's sampling scripts do.
    bf16 means autocast for the reference model; the fused model computes in its weights' dtype by itself.
    """

    def __init__(
        self, model: nn.Module, cfg_scale: float, cfg_channels: int | str, precision: str, compile: bool = False
    ):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.cfg_channels = cfg_channels
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" and not model.fused else None
        forward = model.forward if self.cfg_scale == 1.0 else model.forward_with_cfg
        self.forward = torch.compile(forward, dynamic=False) if compile else forward

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w), t (N,) model timesteps, y (N,) labels -> (N, C_out, h, w)."""
        with torch.autocast(
            x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None, cache_enabled=False
        ):
            if self.cfg_scale == 1.0:
                return self.forward(x, t, y)  # (N, C_out, h, w)
            null = torch.full_like(y, self.model.num_classes)  # (N,)
            both = self.forward(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), self.cfg_scale, self.cfg_channels
            )  # (2N, C_out, h, w), both halves guided alike
            return both[: len(x)]


@dataclass
class StepBuffers:
    """Static inputs and state of the sampling loop; a captured graph reads and writes exactly these."""

    x: torch.Tensor  # (N, C, h, w) float32: x_t, updated in place to x_{t-1}
    y: torch.Tensor  # (N,) int64 class labels
    noise: torch.Tensor | None  # (N, S, C, h, w) float32 per-step DDPM noise; None for DDIM
    steps: torch.Tensor  # (S,) int64 respaced step indices, descending S-1 .. 0
    counter: torch.Tensor  # (1,) int64: how many steps have run

    @property
    def batch_size(self) -> int:
        return len(self.x)


class SamplerLoop:
    """DiT's class-conditional sampling loop for one (sampler, steps, guidance, precision) setting.

    run() draws nothing itself: it takes x_T (N, C, h, w) and, for DDPM, the noise of every step
    (N, S, C, h, w), so an image depends only on its own noise and label, whatever batch it is in (up to
    the rounding of matmuls at another batch size). With cuda_graph the step is captured once per batch
    shape and replayed; a smaller batch
    is padded to the captured one. compile wraps the model call in torch.compile.
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: str = "ddpm",
        num_steps: int = 250,
        cfg_scale: float = 4.0,
        cfg_channels: int | str = 3,
        precision: str = "fp32",
        cuda_graph: bool = False,
        compile: bool = False,
    ):
        check_sampling_options(sampler, num_steps, cfg_scale, cfg_channels, precision)
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, not {self.device}")
        self.sampler = sampler
        self.num_steps = num_steps
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.diffusion = sampler_diffusion(sampler, num_steps)
        self.denoiser = GuidedDenoiser(model, cfg_scale, cfg_channels, precision, compile)
        self.latent_shape = (model.in_channels, model.cfg.input_size, model.cfg.input_size)
        self.buffers: StepBuffers | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _allocate(self, batch_size: int) -> StepBuffers:
        noises = num_step_noises(self.sampler, self.num_steps)
        device = self.device
        return StepBuffers(
            x=torch.zeros(batch_size, *self.latent_shape, device=device),
            y=torch.zeros(batch_size, dtype=torch.long, device=device),
            noise=torch.zeros(batch_size, noises, *self.latent_shape, device=device) if noises else None,
            steps=torch.arange(self.num_steps - 1, -1, -1, device=device),
            counter=torch.zeros(1, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def step_body(self) -> None:
        """One step x_t -> x_{t-1} on the buffers; eager, or what the CUDA graph holds."""
        buffers = self.buffers
        t = buffers.steps.index_select(0, buffers.counter).expand(buffers.batch_size)  # (N,) respaced step
        model_kwargs = {"y": buffers.y}
        if self.sampler == "ddpm":
            out = self.diffusion.p_mean_variance(self.denoiser, buffers.x, t, model_kwargs=model_kwargs)
            noise = buffers.noise.index_select(1, buffers.counter).squeeze(1)  # (N, C, h, w)
            nonzero = (t > 0).to(buffers.x.dtype).view(-1, 1, 1, 1)  # no noise at the last step
            x_prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise  # (N, C, h, w)
        else:
            x_prev = self.diffusion.ddim_sample(self.denoiser, buffers.x, t, model_kwargs=model_kwargs)["sample"]
        buffers.x.copy_(x_prev)
        buffers.counter.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (compile, autotune, attention choice), then capture one step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP_STEPS):
                self.buffers.counter.zero_()  # stays inside the step table however few steps there are
                self.step_body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.buffers.counter.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step_body()

    def prepare(self, x_T: torch.Tensor, labels: torch.Tensor, step_noise: torch.Tensor | None = None) -> int:
        """Load a batch into the buffers (allocating, and capturing the graph, when the shape is new); returns N.

        x_T (N, C, h, w); labels (N,); step_noise (N, S, C, h, w) for DDPM, None for DDIM.
        """
        n = len(x_T)
        if tuple(x_T.shape[1:]) != self.latent_shape or labels.shape != (n,):
            raise ValueError(
                f"x_T {tuple(x_T.shape)} and labels {tuple(labels.shape)} must be "
                f"(N, {', '.join(map(str, self.latent_shape))}) and (N,)"
            )
        noises = num_step_noises(self.sampler, self.num_steps)
        if noises and (step_noise is None or tuple(step_noise.shape) != (n, noises, *self.latent_shape)):
            got = None if step_noise is None else tuple(step_noise.shape)
            raise ValueError(f"{self.sampler} needs step_noise of shape {(n, noises, *self.latent_shape)}, got {got}")
        reusable = self.buffers is not None and (
            self.buffers.batch_size == n or (self.graph is not None and self.buffers.batch_size > n)
        )
        if not reusable:
            self.graph = None
            self.buffers = self._allocate(n)
            if self.cuda_graph:
                with matmul_precision(self.precision):
                    self._capture()
        buffers = self.buffers
        buffers.x.zero_()
        buffers.y.zero_()
        buffers.x[:n].copy_(x_T)
        buffers.y[:n].copy_(labels)
        if buffers.noise is not None:
            buffers.noise.zero_()
            buffers.noise[:n].copy_(step_noise)
        buffers.counter.zero_()
        return n

    def step(self) -> None:
        """Advance the loaded batch by one step (a graph replay with cuda_graph)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            with matmul_precision(self.precision):
                self.step_body()

    def run(
        self, x_T: torch.Tensor, labels: torch.Tensor, step_noise: torch.Tensor | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Sample from x_T: returns x_0, (N, C, h, w) float32 latents on the model's device."""
        n = self.prepare(x_T, labels, step_noise)
        for _ in tqdm(range(self.num_steps), desc=f"{self.sampler} steps", disable=not progress):
            self.step()
        return self.buffers.x[:n].clone()
