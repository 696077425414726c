"""What every op's launcher shares: how its kernels are called, and how its inputs become 2-D rows.

Under TRITON_INTERPRET=1 triton.jit returns an InterpretedFunction: it runs eagerly on CPU tensors, and
wrap_triton rejects it before torch 2.13, so the launchers call it directly (no torch.compile on CPU). On
the GPU kernels are wrapped, so torch.compile sees them inside the ops' triton_op bodies.
"""
import torch
import triton
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


RUNS_IN_INTERPRETER = isinstance(_probe, InterpretedFunction)


def launchable(kernel):
    """The kernel as torch.compile should see it: wrapped on the GPU, plain under the interpreter."""
    return kernel if RUNS_IN_INTERPRETER else wrap_triton(kernel)


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """View a (..., width) tensor as (M, width) rows with unit column stride, copying only if that is impossible."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, width)  # (M, width): a view unless the rows are not evenly strided
