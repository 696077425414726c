"""What every op's launcher shares: how its kernels are called, how its inputs become 2-D rows, and how an
elementwise kernel finds its tile.

Under TRITON_INTERPRET=1 triton.jit returns an InterpretedFunction: it runs eagerly on CPU tensors, and
wrap_triton rejects it before torch 2.13, so the launchers call it directly (no torch.compile on CPU). On
the GPU kernels are wrapped, so torch.compile sees them inside the ops' triton_op bodies.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


RUNS_IN_INTERPRETER = isinstance(_probe, InterpretedFunction)


@triton.jit
def row_major_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, cols) of this program's (BLOCK_M, BLOCK_N) tile on a one-axis grid, column blocks fastest.

    Programs that run at the same time then cover whole rows, contiguous memory, rather than one column
    stripe of many rows. rows (BLOCK_M,) are int64, so M * N >= 2^31 works; cols (BLOCK_N,) are int32.
    """
    n_column_blocks = tl.cdiv(N, BLOCK_N)
    program = tl.program_id(0).to(tl.int64)
    rows = (program // n_column_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (program % n_column_blocks).to(tl.int32) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


def launchable(kernel):
    """The kernel as torch.compile should see it: wrapped on the GPU, plain under the interpreter."""
    return kernel if RUNS_IN_INTERPRETER else wrap_triton(kernel)


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """View a (..., width) tensor as (M, width) rows with unit column stride, copying only if that is impossible."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, width)  # (M, width): a view unless the rows are not evenly strided
