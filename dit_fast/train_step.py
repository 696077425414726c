"""The training step: loss, backward, the all-reduced grad norm and finite check, the optimizer and the EMA update.

The finite check costs no host sync: a step whose loss or grad norm is not finite is recorded on the device,
and from it on every update is skipped there (fused AdamW's found_inf, an EMA weight of zero), so the weights,
the optimizer state and the EMA stay those of the last good step until the host reads the record
(`first_non_finite`, which train.py does every --log-every steps and before each checkpoint or sample).
apex's FusedAdam takes no found_inf: with it the record is read every step, before the optimizer.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dit_fast.diffusion import GaussianDiffusion
from dit_fast.ema import ShardedEMA
from dit_fast.parallel import local_tensor

OPTIMIZERS = ("adamw", "apex")


@dataclass
class StepStats:
    """All-reduced over ranks, on the device: the global mean loss and the gradient norm (before clipping)."""

    loss: torch.Tensor  # () fp32
    grad_norm: torch.Tensor  # () fp32

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.loss) & torch.isfinite(self.grad_norm)  # () bool


@dataclass
class NonFiniteStep:
    """The first step whose all-reduced loss or gradient norm was not finite, as read back by the host."""

    step: int
    loss: float
    grad_norm: float


class TrainStep:
    """One optimisation step in two halves, so the caller can stop between them: gradients(), then update().

    It takes over classifier-free-guidance label dropout from the model (the model's own draw would use
    each rank's device RNG): labels are replaced by the null class where drop_label is True.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: torch.optim.Optimizer,
        ema: ShardedEMA,
        max_grad_norm: float | None = None,
    ):
        self.model = model
        self.diffusion = diffusion
        self.optimizer = optimizer
        self.ema = ema
        self.max_grad_norm = max_grad_norm
        self.null_class = model.y_embedder.num_classes
        self.label_dropout = model.y_embedder.dropout_prob
        model.y_embedder.dropout_prob = 0.0
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.skips_on_device = bool(optimizer.defaults.get("fused"))  # torch's fused AdamW honours found_inf
        device = self.params[0].device
        self._first_bad = torch.zeros(3, device=device)  # [step (0: none yet), loss, grad norm] of the first bad step

    def local_grads(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [local_tensor(param.grad) for param in self.params]

    def gradients(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, drop_label: torch.Tensor
    ) -> StepStats:
        """Forward, loss and backward; one all-reduce of [loss, squared grad norm] gives the global stats."""
        y = torch.where(drop_label, self.null_class, y)  # (n,)
        loss = self.diffusion.training_losses(self.model, x, t, {"y": y}, noise=noise)["loss"].mean()
        loss.backward()
        squares = torch.stack(torch._foreach_norm(self.local_grads())).square().sum()  # each element lives on one rank
        totals = torch.stack([loss.detach().float(), squares])  # (2,)
        dist.all_reduce(totals)
        return StepStats(totals[0] / dist.get_world_size(), totals[1].sqrt())

    def update(self, stats: StepStats, step: int) -> None:
        """Clip (when asked), optimizer step, zero the gradients, EMA update: skipped on the device from the
        first step (numbered `step`) whose stats are not finite on."""
        newly_bad = ~stats.finite() & (self._first_bad[0] == 0)  # () bool
        record = torch.stack([torch.full_like(stats.loss, step), stats.loss, stats.grad_norm])  # (3,)
        self._first_bad = torch.where(newly_bad, record, self._first_bad)
        halted = (self._first_bad[0] > 0).float()  # () 1.0 from the first bad step on
        if self.skips_on_device:
            self.optimizer.found_inf = halted
        elif self.first_non_finite() is not None:  # the optimizer cannot skip by itself: a host read
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.max_grad_norm is not None:
            scale = (self.max_grad_norm / (stats.grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(self.local_grads(), scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(active=1.0 - halted)

    def first_non_finite(self) -> NonFiniteStep | None:
        """The first non-finite step so far, or None (one host read)."""
        step, loss, grad_norm = self._first_bad.tolist()
        return NonFiniteStep(int(step), loss, grad_norm) if step > 0 else None


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay: torch's fused kernel (CUDA and CPU), or apex FusedAdam."""
    if name == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(params, lr=lr, weight_decay=0.0, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
