"""Exponential moving average of the model's weights, in fp32, sharded exactly like the parameters.

An FSDP module cannot be deep-copied, so the EMA is a list of tensors beside the parameters: one fp32
DTensor per parameter with the parameter's sharding (a plain tensor for an unsharded model). An update
is one fused multi-tensor op over the local shards: ema <- ema + (1 - decay) * (param - ema).
"""

import torch
from torch import nn

from dit_fast.parallel import clean_name, full_tensor, local_tensor

DEFAULT_DECAY = 0.9999


class ShardedEMA:
    """fp32 EMA of every parameter of `model` (the frozen pos_embed included, as in the official files).

    It starts as a copy of the model, what an update with decay 0 gives (the original's step-0 update).
    """

    def __init__(self, model: nn.Module, decay: float = DEFAULT_DECAY):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay!r} must be in [0, 1]")
        self.decay = decay
        named = list(model.named_parameters())
        self.names = [clean_name(name) for name, _ in named]
        with torch.no_grad():
            self.shadow = [param.detach().float().clone() for _, param in named]  # DTensors like the params
        # Local shards are views of the parameters' and the EMA's storage; the optimizer and checkpoint
        # loading update those storages in place, so the views stay valid for the whole run.
        self._param_shards = [local_tensor(param.detach()) for _, param in named]
        self._shadow_shards = [local_tensor(tensor) for tensor in self.shadow]

    @torch.no_grad()
    def update(self, decay: float | None = None, active: torch.Tensor | None = None) -> None:
        """ema <- lerp(ema, param, 1 - decay) on every local shard in one foreach call.

        active: a () device tensor, 1 to update and 0 to leave the EMA as it is (a skipped training step),
        decided on the device without a host read.
        """
        weight = 1.0 - (self.decay if decay is None else decay)
        if active is None:
            torch._foreach_lerp_(self._shadow_shards, self._param_shards, weight)
        else:
            weights = [active * weight] * len(self._shadow_shards)  # one () tensor, broadcast over each shard
            torch._foreach_lerp_(self._shadow_shards, self._param_shards, weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{official name: fp32 (D)Tensor}; loading a checkpoint into it updates the EMA in place."""
        return dict(zip(self.names, self.shadow))

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The unsharded EMA weights (a collective: every rank must call it); empty where keep is False."""
        full = {}
        for name, tensor in zip(self.names, self.shadow):
            whole = full_tensor(tensor)
            if keep:
                full[name] = whole
        return full
