"""IDDPM Gaussian diffusion for DiT: beta schedules, timestep respacing, the hybrid loss, DDPM and DDIM samplers."""
from .gaussian_diffusion import GaussianDiffusion, mean_flat
from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .respace import ACCEPTED_FORMS, respace_betas, space_timesteps
from .schedules import NOISE_SCHEDULES, cosine_beta_schedule, get_beta_schedule, linear_beta_schedule

__all__ = [
    "ACCEPTED_FORMS",
    "NOISE_SCHEDULES",
    "GaussianDiffusion",
    "cosine_beta_schedule",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "respace_betas",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | int | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """DiT's diffusion: diffusion_steps of the named schedule, respaced by timestep_respacing ("" all, "250",
    "25,25", "ddim50"); learned-range variance when learn_sigma, else fixed (beta, or beta_tilde if sigma_small)."""
    betas = get_beta_schedule(noise_schedule, diffusion_steps)  # (diffusion_steps,)
    kept_steps = space_timesteps(diffusion_steps, timestep_respacing)
    return GaussianDiffusion(
        respace_betas(betas, kept_steps), learn_sigma=learn_sigma, sigma_small=sigma_small, timestep_map=kept_steps
    )
