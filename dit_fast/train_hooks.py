"""TrainHooks, the fault injection and inspection tests pass to dit_fast.train, and the TrainObjects they see."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dit_fast.ema import ShardedEMA
from dit_fast.parallel import DistEnv


@dataclass
class TrainHooks:
    """Fault injection and inspection for tests (steps count from 1)."""

    nan_inputs_at_step: int | None = None  # poison that step's latents: the loss turns non-finite
    exit_during_checkpoint_at_step: int | None = None  # os._exit(1) after writing that checkpoint, before its rename
    exit_after_step: int | None = None  # os._exit(1) once that step (and its checkpoint) is done: a kill
    vae: object | None = None  # used instead of loading --vae (a fake encoder/decoder in tests)
    on_finish: Callable[["TrainObjects"], None] | None = None  # every rank, before the process group closes


@dataclass
class TrainObjects:
    """What a run built; handed to TrainHooks.on_finish."""

    env: DistEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ShardedEMA
    step: int
