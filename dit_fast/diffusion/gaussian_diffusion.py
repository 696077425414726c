"""Gaussian diffusion as DiT trains and samples it: epsilon prediction with IDDPM's learned-range variance.

The model output has C channels of epsilon and, when learn_sigma, C more channels v in [-1, 1] that set the log
variance to frac * log(beta_t) + (1 - frac) * log(beta_tilde_t), frac = (v + 1) / 2 (Nichol & Dhariwal 2021).
Tables are float64 on the host, copied once per device, gathered at t and cast to x's dtype: the samplers never
wait on the device. The model is always called with original (un-respaced) timestep indices.
"""
import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .likelihood import discretized_gaussian_log_likelihood, normal_kl

Model = Callable[..., torch.Tensor]  # model(x, t, **model_kwargs) -> (N, 2C or C, ...)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion over the given betas, optionally a respaced subset of a longer process.

    timestep_map[i] is the original timestep of step i (identity when not respaced); the model sees those.
    """

    _DEVICE_TABLES = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "one_minus_alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "log_betas",
        "fixed_log_variance",
        "timestep_map",
    )

    def __init__(
        self,
        betas: torch.Tensor,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        timestep_map: list[int] | torch.Tensor | None = None,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must be a non-empty 1-D table with values in (0, 1], got {betas}")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.timestep_map = (
            torch.arange(self.num_timesteps)
            if timestep_map is None
            else torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        )  # (T,)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map has shape {tuple(self.timestep_map.shape)}, expected ({self.num_timesteps},) like betas"
            )

        self.betas = betas  # (T,) float64, like every table below
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.one_minus_alphas_cumprod_prev = 1.0 - self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0, so its log is clipped to beta_tilde_1 (beta_0 when there is a single step)
        first_variance = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([first_variance, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - self.alphas_cumprod)

        self.log_betas = betas.log()  # upper end of the learned range
        # without learn_sigma: beta_tilde ("small") or beta with beta_tilde_1 at t = 0 ("large", DiT's default)
        self.fixed_log_variance = (
            self.posterior_log_variance_clipped
            if sigma_small
            else torch.cat([first_variance, betas[1:]]).log()
        )
        self._tables_by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ---- tables ---------------------------------------------------------------------------------------------

    def _tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tables copied to device, once per device."""
        if device not in self._tables_by_device:
            self._tables_by_device[device] = {name: getattr(self, name).to(device) for name in self._DEVICE_TABLES}
        return self._tables_by_device[device]

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t, cast to like's dtype and broadcast to like's shape: (N,) -> like.shape."""
        values = self._tables_on(t.device)[name][t].to(like.dtype)  # (N,)
        return values.view(-1, *([1] * (like.ndim - 1))).expand_as(like)  # like.shape

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices for (possibly respaced) step indices t, gathered on t's device: (N,) -> (N,)."""
        return self._tables_on(t.device)["timestep_map"][t]

    # ---- forward process and its posterior -------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )  # (N, C, H, W)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each x_t's shape."""
        mean = (
            self._gather("posterior_mean_coef1", t, x_t) * x_start + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )  # (N, C, H, W)
        variance = self._gather("posterior_variance", t, x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), the inverse of _predict_xstart_from_eps."""
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---- the model's reverse step ----------------------------------------------------------------------------

    def _run_model(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Call the model at the original timesteps; return (eps, v), v None without learn_sigma, in x's dtype."""
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels if self.learn_sigma else channels, *x.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"model output has shape {tuple(output.shape)}, expected {expected} "
                f"({'eps and variance channels' if self.learn_sigma else 'eps channels'} for input {tuple(x.shape)})"
            )
        output = output.to(x.dtype)
        if not self.learn_sigma:
            return output, None
        eps, v = output.split(channels, dim=1)  # (N, C, H, W) each
        return eps, v

    def _model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2: interpolated between log beta_tilde_t and log beta_t by v in [-1, 1], or the fixed table."""
        if v is None:
            return self._gather("fixed_log_variance", t, x)
        frac = (v + 1.0) / 2.0
        return frac * self._gather("log_betas", t, x) + (1.0 - frac) * self._gather(
            "posterior_log_variance_clipped", t, x
        )  # (N, C, H, W)

    def _reverse_gaussian(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor | None, clip_denoised: bool
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): the posterior mean at the predicted x_0 and the model's variance."""
        pred_xstart = self._predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        log_variance = self._model_log_variance(v, t, x_t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model once; return the mean, variance, log_variance and pred_xstart of p(x_{t-1} | x_t)."""
        eps, v = self._run_model(model, x, t, model_kwargs)
        return self._reverse_gaussian(x, t, eps, v, clip_denoised)

    # ---- training --------------------------------------------------------------------------------------------

    def _vb_terms_bpd(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-sample VLB term in bits: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the
        discretised decoder NLL -log p(x_0 | x_1) at t = 0: (N,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        model = self._reverse_gaussian(x_t, t, eps, v, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"]))  # (N,)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, model["mean"], 0.5 * model["log_variance"])
        )  # (N,)
        return torch.where(t == 0, decoder_nll.to(kl.dtype), kl) / math.log(2.0)  # (N,)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """IDDPM's hybrid loss per sample: {"loss": mse + vb, "mse", "vb"}, each (N,).

        mse is the epsilon regression; vb is the VLB term with the predicted mean detached (it trains only the
        variance channels), times num_timesteps / 1000 so respaced processes keep the same weight. Without
        learn_sigma, vb is zeros and loss is mse. t holds step indices in 0..num_timesteps-1 (not checked here:
        that would stall the device).
        """
        if t.shape != (x_start.shape[0],):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected ({x_start.shape[0]},): one step per sample")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)  # (N, C, H, W)
        eps, v = self._run_model(model, x_t, t, model_kwargs)
        mse = mean_flat((noise - eps) ** 2)  # (N,)
        if self.learn_sigma:
            vb = self._vb_terms_bpd(x_start, x_t, t, eps.detach(), v) * (self.num_timesteps / 1000.0)  # (N,)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ---- sampling --------------------------------------------------------------------------------------------

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """1 where t > 0 and 0 at the last step, as a tensor (no host sync): (N,) -> (N, 1, ..., 1)."""
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _initial_noise(
        shape: tuple[int, ...],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """x_T: the given noise, or N(0, I) drawn from generator on device (default: the generator's, else CPU)."""
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the sample shape {tuple(shape)}")
            return noise if device is None else noise.to(device)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=device)

    def _descending_steps(self, batch_size: int, device: torch.device, progress: bool) -> Iterator[torch.Tensor]:
        """t = T-1, ..., 0 as (N,) step-index tensors on device; a tqdm bar when progress."""
        steps = range(self.num_timesteps - 1, -1, -1)
        for step in tqdm(steps) if progress else steps:
            yield torch.full((batch_size,), step, device=device, dtype=torch.long)  # (N,)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + sigma * z, with no noise at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise  # (N, C, H, W)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """DDPM ancestral sampling from x_T, yielding {"sample", "pred_xstart"} after every step."""
        x = self._initial_noise(shape, noise, device, generator)
        for t in self._descending_steps(shape[0], x.device, progress):
            out = self.p_sample(model, x, t, clip_denoised, model_kwargs, generator)
            yield out
            x = out["sample"]

    def p_sample_loop(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling; returns x_0 of the given shape."""
        for out in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, generator
        ):
            sample = out["sample"]
        return sample

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step: x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, with
        sigma = eta * sqrt(beta_tilde_t); eta = 0 is deterministic, eta = 1 is DDPM with variance beta_tilde."""
        eps, _ = self._run_model(model, x, t, model_kwargs)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        sigma_squared = eta**2 * self._gather("posterior_variance", t, x)
        eps_scale = (self._gather("one_minus_alphas_cumprod_prev", t, x) - sigma_squared).clamp(min=0.0).sqrt()
        sample = self._gather("alphas_cumprod_prev", t, x).sqrt() * pred_xstart + eps_scale * eps  # (N, C, H, W)
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sample = sample + self._nonzero_mask(t, x) * sigma_squared.sqrt() * noise
        return {"sample": sample, "pred_xstart": pred_xstart}

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """DDIM sampling from x_T, yielding {"sample", "pred_xstart"} after every step."""
        x = self._initial_noise(shape, noise, device, generator)
        for t in self._descending_steps(shape[0], x.device, progress):
            out = self.ddim_sample(model, x, t, clip_denoised, model_kwargs, eta, generator)
            yield out
            x = out["sample"]

    def ddim_sample_loop(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling; returns x_0 of the given shape."""
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, eta, generator
        ):
            sample = out["sample"]
        return sample
