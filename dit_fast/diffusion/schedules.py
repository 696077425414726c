"""Beta schedules of the forward process, as float64 tables: Ho et al.'s linear one and Nichol & Dhariwal's cosine one."""
import math
from collections.abc import Callable

import torch


def linear_beta_schedule(num_steps: int) -> torch.Tensor:
    """Betas from 1e-4 to 0.02 at 1000 steps, both ends scaled by 1000 / num_steps so other lengths add similar noise."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)  # (T,)


def cosine_beta_schedule(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2) at u = i / T; capped so the last step stays finite."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # (T + 1,)
    alpha_bar = torch.cos((u + offset) / (1.0 + offset) * (math.pi / 2)) ** 2  # (T + 1,)
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)  # (T,)


NOISE_SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def get_beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """The named schedule's betas for num_steps steps, float64, shape (num_steps,)."""
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(NOISE_SCHEDULES)}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive integer, got {num_steps!r}")
    return NOISE_SCHEDULES[name](num_steps)
