"""Sharded training checkpoints: save, find the latest complete one, resume, keep the last k.

A checkpoint is a directory `checkpoints/<step:07d>/` holding
  - a torch.distributed.checkpoint (DCP) of {"model", "optim", "ema"}: every rank writes its shards, and
    a checkpoint written by N ranks loads on M ranks (DCP reshards);
  - trainer.json (rank 0): step, data position, world size, the run's arguments;
  - rng-rank<r>.pt: rank r's torch CPU / CUDA, python `random` and numpy generator states.
It is written under `<step>.tmp/` and renamed once every rank has finished (barrier, then rank 0
renames), so a process killed mid-write leaves only a `.tmp` directory, which is never loaded and is
removed by the next save. Older complete checkpoints are deleted only after the new one is complete.
"""

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dit_fast.config import DIT_CONFIGS
from dit_fast.ema import ShardedEMA
from dit_fast.parallel import DistEnv

STEP_DIGITS = 7
TMP_SUFFIX = ".tmp"
TRAINER_FILE = "trainer.json"
COMPLETE_NAME = re.compile(rf"^\d{{{STEP_DIGITS}}}$")


def checkpoint_name(step: int) -> str:
    return f"{step:0{STEP_DIGITS}d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under `root` (a run's checkpoints/ directory), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and COMPLETE_NAME.match(path.name)]
    return sorted(found, key=lambda path: int(path.name))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete checkpoint directory (it holds trainer.json and DCP's .metadata)."""
    path = Path(path)
    return (path / TRAINER_FILE).is_file() and (path / ".metadata").is_file()


def read_trainer_state(path: str | os.PathLike) -> dict:
    """trainer.json of a checkpoint: step, data position, world size and the run's arguments."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete training checkpoint (no {TRAINER_FILE} and .metadata); "
            f"pass a directory like results/<run>/checkpoints/{checkpoint_name(1000)}"
        )
    state = json.loads((path / TRAINER_FILE).read_text())
    # checkpoints from before --num-classes hold no class count: they have their model config's
    state.setdefault("num_classes", DIT_CONFIGS[state["model"]].num_classes)
    return state


def capture_rng_state() -> dict:
    """This process's generator states, in a form torch.load(weights_only=True) reads back."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": numpy_state[2],
            "has_gauss": numpy_state[3],
            "cached_gaussian": numpy_state[4],
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    key = numpy_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-rank{rank}.pt"


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA) -> dict:
    """The sharded state DCP saves and loads in place: model, optimizer (keyed by parameter name), EMA."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "ema": ema.state_dict()}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ShardedEMA,
    trainer_state: dict,
    env: DistEnv,
    keep_last: int = 0,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write checkpoint `step` on every rank; returns its final path. keep_last > 0 deletes older ones.

    before_rename runs on every rank after the write and before the rename (a test hook).
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + TMP_SUFFIX)
    if env.is_main:
        for stale in root.glob(f"*{TMP_SUFFIX}"):  # left by a process killed while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(training_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save(capture_rng_state(), _rng_file(tmp, env.rank))
    if env.is_main:
        (tmp / TRAINER_FILE).write_text(json.dumps(dict(trainer_state, step=step), indent=1) + "\n")
    if before_rename is not None:
        before_rename()
    dist.barrier()  # every rank's shards and RNG file are on disk
    if env.is_main:
        if final.exists():  # a rerun from an older checkpoint reaches this step again
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA, env: DistEnv
) -> dict:
    """Load model, optimizer and EMA (resharded to this world size) and this rank's RNG states.

    Returns trainer.json. When the checkpoint came from another world size, ranks without a saved RNG
    file keep their freshly seeded generators (the training loop's own randomness depends only on the
    seed and the step, so the run continues the same way).
    """
    path = Path(path)
    trainer_state = read_trainer_state(path)
    state = training_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = _rng_file(path, env.rank)
    if trainer_state.get("world_size") == env.world_size and rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state
