"""Timestep respacing (IDDPM): keep a subset of the original steps and rebuild betas so alpha_bar is unchanged there."""
import torch

ACCEPTED_FORMS = (
    '"" (all steps), "N" or "N1,N2,..." (N_i evenly spaced steps in each of equal sections), '
    '"ddimN" (N steps at one integer stride, starting at step 0)'
)


def _ddim_steps(num_steps: int, spec: str, count: int) -> list[int]:
    """Steps 0, s, 2s, ... for the smallest integer stride s that gives exactly count steps."""
    counts_by_stride = {stride: len(range(0, num_steps, stride)) for stride in range(1, num_steps + 1)}
    for stride, stride_count in counts_by_stride.items():
        if stride_count == count:
            return list(range(0, num_steps, stride))
    below = max((c for c in counts_by_stride.values() if c < count), default=None)
    above = min((c for c in counts_by_stride.values() if c > count), default=None)
    nearest = " or ".join(f"ddim{c}" for c in (below, above) if c is not None)
    raise ValueError(
        f"timestep_respacing {spec!r}: no integer stride gives exactly {count} of {num_steps} steps; nearest: {nearest}"
    )


def _sectioned_steps(num_steps: int, spec: str, section_counts: list[int]) -> list[int]:
    """Split the steps into len(section_counts) near-equal sections; take section_counts[i] evenly spaced steps
    (first and last included, fractional stride rounded) from section i."""
    base_size, remainder = divmod(num_steps, len(section_counts))
    kept, section_start = [], 0
    for index, count in enumerate(section_counts):
        size = base_size + (1 if index < remainder else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"timestep_respacing {spec!r}: section {index} has {size} steps, so it can keep 1..{size}, not {count}; "
                f"accepted forms: {ACCEPTED_FORMS}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return kept


def space_timesteps(num_steps: int, spec: str | int | None) -> list[int]:
    """The sorted original timesteps a respacing spec keeps out of num_steps (see ACCEPTED_FORMS)."""
    text = "" if spec is None else str(spec).strip()
    if text == "":
        return list(range(num_steps))
    body = text[len("ddim"):] if text.startswith("ddim") else text
    try:
        counts = [int(part) for part in body.split(",")]
    except ValueError:
        raise ValueError(f"timestep_respacing {spec!r} is not understood; accepted forms: {ACCEPTED_FORMS}") from None
    if text.startswith("ddim"):
        if len(counts) != 1 or not 1 <= counts[0] <= num_steps:
            raise ValueError(
                f"timestep_respacing {spec!r}: ddimN needs one N in 1..{num_steps}; accepted forms: {ACCEPTED_FORMS}"
            )
        return _ddim_steps(num_steps, text, counts[0])
    if not 1 <= sum(counts) <= num_steps:
        raise ValueError(
            f"timestep_respacing {spec!r} asks for {sum(counts)} steps; the number of steps must be in 1..{num_steps}; "
            f"accepted forms: {ACCEPTED_FORMS}"
        )
    return sorted(set(_sectioned_steps(num_steps, text, counts)))


def respace_betas(betas: torch.Tensor, kept_steps: list[int]) -> torch.Tensor:
    """Betas of the process that visits only kept_steps: 1 - alpha_bar[t_i] / alpha_bar[t_(i-1)], with alpha_bar = 1
    before the first step, so the respaced alpha_bar equals the original at every kept step."""
    alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)  # (T,)
    kept_alphas_cumprod = alphas_cumprod[torch.tensor(kept_steps, dtype=torch.long)]  # (S,)
    previous = torch.cat([kept_alphas_cumprod.new_ones(1), kept_alphas_cumprod[:-1]])  # (S,)
    return 1.0 - kept_alphas_cumprod / previous  # (S,)
