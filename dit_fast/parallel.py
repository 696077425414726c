"""Distributed set-up and the FSDP2 build of a DiT for training.

Order (DESIGN.md section 5): build on the meta device -> activation checkpointing (optional) ->
`block.compile(fullgraph=True)` per block (optional) -> `fully_shard` per block, then the root, with
bf16 compute parameters, fp32 gradient reduction and fp32 master weights -> `to_empty` -> initial
weights. The initial weights are the paper's init computed by the plain model on the CPU from the
global seed and loaded shard by shard (xavier init cannot run on DTensors), so every world size
starts from the same weights.

FSDP units (`units`): "block" is one unit per block plus the root, what several ranks need. With one rank
a block's "shard" is the whole block, so per-block units only add hooks and copies, and they keep the
fast path from hoisting the adaLN projections (that product reads every block's weights before any block
runs). "root" makes the whole model one unit, gathered (cast to bf16) once per step, so the fast adaLN-Zero
model runs its hoisted, norm-chained body as it does outside FSDP. "auto" (the default) picks "root" for
one rank without activation checkpointing, "block" otherwise. Parameter names, the checkpoint format and
the numbers are the same either way: a checkpoint written under one resumes under the other.

One process without torchrun gets a process group of size 1 (an in-process store), so the same
FSDP2 code path runs for 1 and N ranks; NCCL on CUDA, gloo on the CPU.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dit_fast.model import DiT, create_model

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # added to parameter names by AC / compile
FSDP_UNITS = ("auto", "block", "root")
BLOCK_PRECISION = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
ROOT_PRECISION = MixedPrecisionPolicy(  # the model's output in fp32, so the loss is computed in fp32
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> DistEnv:
    """Join torchrun's process group (env://), or make a group of one; NCCL on CUDA, gloo on the CPU."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if launched_by_torchrun():
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextmanager
def distributed() -> Iterator[DistEnv]:
    """init_distributed for the duration of a `with`; destroys the group only if this call created it."""
    created = not dist.is_initialized()
    env = init_distributed()
    try:
        yield env
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def clean_name(name: str) -> str:
    """A parameter name without the activation-checkpointing / compile wrapper segments: the official key."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that shares its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reference_weights(name: str, kwargs: dict, seed: int) -> DiT:
    """The model with the paper's init drawn from `seed` on the CPU (the caller's RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **kwargs)


def build_fsdp_model(
    name: str,
    env: DistEnv,
    seed: int,
    image_size: int | None = None,
    block: str = "adaLN-Zero",
    num_classes: int | None = None,
    attn: str = "auto",
    fused: bool = False,
    grad_ckpt: bool = False,
    compile_blocks: bool = False,
    units: str = "auto",
) -> DiT:
    """A DiT sharded over all ranks with FSDP2, initialised from `seed` identically for every world size.

    image_size and num_classes None keep the config's; `units` is one of FSDP_UNITS (module docstring).
    """
    per_block = fsdp_units(units, env.world_size, grad_ckpt) == "block"
    kwargs = {"image_size": image_size, "block": block, "fused": fused, "attn": attn}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    # the hoisted adaLN product reads every block's weights: only possible when no block is a unit of its own
    model.hoist_modulation = model.hoist_modulation and not (per_block or grad_ckpt)
    if grad_ckpt:
        for index, layer in enumerate(model.blocks):
            # the blocks draw no random numbers
            model.blocks[index] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if compile_blocks:
        model.compile_blocks(dynamic=False)  # one batch size per run: static shapes
    if per_block:
        sharded = env.world_size > 1  # with one rank, resharding after forward would only re-copy the weights
        for layer in model.blocks:
            fully_shard(layer, mp_policy=BLOCK_PRECISION, reshard_after_forward=sharded)
    fully_shard(model, mp_policy=ROOT_PRECISION, reshard_after_forward=False)  # backward needs the root at once
    model.to_empty(device=env.device)
    load_full_weights(model, reference_weights(name, kwargs, seed))
    return model


def fsdp_units(units: str, world_size: int, grad_ckpt: bool) -> str:
    """What `units` (one of FSDP_UNITS) means for this world size: "block" or "root"."""
    if units not in FSDP_UNITS:
        raise ValueError(f"unknown FSDP units {units!r}; choose one of {', '.join(FSDP_UNITS)}")
    if units == "auto":
        return "root" if world_size == 1 and not grad_ckpt else "block"
    return units


def load_full_weights(model: nn.Module, reference: nn.Module) -> None:
    """Copy a full (unsharded) model into a sharded one: parameters by state_dict, buffers by name."""
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    reference_buffers = dict(reference.named_buffers())
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            buffer.copy_(reference_buffers[clean_name(buffer_name)])


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
