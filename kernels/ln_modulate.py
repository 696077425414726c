"""Fused adaLN modulation: LayerNorm (no affine, fp32 statistics) followed by `* (1 + scale) + shift`.

Two public ops share one forward and one backward kernel, switched by the `HAS_RESIDUAL` flag:
  ln_modulate(x, shift, scale)                      -> h = LN(x) * (1 + scale) + shift
  gated_residual_ln_modulate(x, y, gate, shift, scale) -> (x_new, h): x_new = x + gate * y, h = ln_modulate(x_new)
The second fuses the residual update of one DiT sub-block with the norm of the next one, one pass over the rows.

shift, scale and gate are per sample, (B, D), broadcast over the T tokens; kernels index them by the
rows' sample (row // T; each program's rows lie in one sample, `sample = pid // n_chunks`). They may be
the strided views that `mod.chunk(6, dim=1)` gives (row stride 6*D): only their last dim must be
contiguous, otherwise they are copied (B*D elements, cheap). x and y are (B, T, D); a last dim with
stride != 1 or rows that are not evenly strided costs one copy (`contiguous`).

Programs and tiles (same structure forward and backward): each program owns a chunk of `rows_per_chunk`
rows of ONE sample (so shift/scale/gate are loaded once per program, as (BLOCK_D,) vectors) and loops over
it in (ROWS, BLOCK_D) tiles. The 1-D grid runs chunks fastest, so programs running together touch
neighbouring rows. The loop is `tl.range(..., num_stages=NUM_STAGES)`: Triton software-pipelines it, issuing
the loads of the next NUM_STAGES - 1 tiles as cp.async into shared memory while the current tile is
reduced, so the bytes in flight per SM no longer depend on registers (the old kernels, one row per program
or per iteration, were latency bound at 20-45% of copy bandwidth).

Launch configs, one rule each (no autotuning): `forward_config(M, D)` / `backward_config(M, D)`, overridable
through the launchers' `config` argument (bench/kernel_sweep.py times alternatives that way).
- BLOCK_D = next_power_of_2(D), at most MAX_BLOCK_D = 8192 (D > 8192 is a ValueError).
- Forward: ROWS = max(1, 4096 // BLOCK_D), num_warps = ROWS * BLOCK_D // 512 within [4, 16] (16 elements
  of each tile tensor per thread), NUM_STAGES = 3, rows_per_chunk = next_power_of_2(M / 1024) (about 1024
  programs) within [ROWS, 256]. At D = 1152 (BLOCK_D = 2048): ROWS = 2, 8 warps, 63 / 79 registers
  (ln / gated), no spills, 16 / 33 KB shared memory on sm_90: 4 / 3 programs and 16 / 12 rows' loads in
  flight per SM (4 / 3 rows if Triton did not build the pipeline).
- Backward: ROWS = max(1, 2048 // BLOCK_D), num_warps = ROWS * BLOCK_D // 256 within [4, 16] (8 per thread),
  NUM_STAGES = 4, rows_per_chunk = next_power_of_2(M / 512) within [ROWS, 256]: fewer, longer chunks than the
  forward, since each chunk writes (B, n_chunks, D) fp32 partials (4% extra bytes at 64-row chunks).
  At D = 1152: ROWS = 1, 8 warps, 64 / 128 registers (ln / gated), no spills, 25 / 49 KB shared memory:
  4 / 2 programs and 12 / 6 rows' loads in flight per SM. Why one row per iteration: the backward's
  registers grow ~35 per row of a tile at 8 warps (xhat, dh, dxhat live together); ROWS = 2 takes the
  gated backward to 140 registers, 1 program per SM.
- Both: NUM_STAGES is cut so that (NUM_STAGES - 1) tiles of the pipelined inputs fit PIPELINE_BYTES of
  shared memory (fp32/fp64 or wide D), tiles are capped at next_power_of_2(T) rows and chunks at T.
Masked lanes: at D = 1152 only 1152 of 2048 lanes are active; a split into 1024 + 128 column parts was
tried and rejected (Triton unified the two parts' layouts, converting the big tile through shared memory).

Math is fp32 (fp64 when the inputs are fp64, so that gradcheck can run); mean and rstd are saved as fp32
(B*T,) for the backward, which recomputes xhat instead of saving it. The backward writes dshift, dscale
and dgate as fp32 per-chunk partial sums (B, n_chunks, D); a torch `.sum(1)` finishes them. No atomics,
so gradients are bit-identical run to run.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

MAX_BLOCK_D = 8192
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Default launch configs (the rule in the module docstring).
FWD_TILE_ELEMENTS, FWD_ELEMENTS_PER_THREAD, FWD_PROGRAMS, FWD_STAGES = 4096, 16, 1024, 3
BWD_TILE_ELEMENTS, BWD_ELEMENTS_PER_THREAD, BWD_PROGRAMS, BWD_STAGES = 2048, 8, 512, 4
MAX_CHUNK = 256  # rows per chunk, at most
PIPELINE_BYTES = 100_000  # shared memory for the tiles in flight of one program, at most


class LaunchConfig(NamedTuple):
    """One launch's block shape, the same fields for both kernels: `rows` (ROWS, rows per loop iteration, a
    power of two), `num_warps`, `rows_per_chunk` (rows of one sample per program, rounded up to whole tiles)
    and `num_stages` (depth of the loop's software pipeline: tiles whose loads are in flight at once)."""

    rows: int
    num_warps: int
    rows_per_chunk: int
    num_stages: int


# Sizes that vary with B and T are not specialised on (divisibility), so one compiled variant serves all.
@triton.jit(do_not_specialize=["T", "n_chunks", "rows_per_chunk"])
def _ln_modulate_fwd_kernel(
    X_ptr,  # (M, D) x, row stride stride_x
    Y_ptr,  # (M, D) branch output added with the gate; read only when HAS_RESIDUAL
    GATE_ptr,  # (B, D) row stride stride_gate; read only when HAS_RESIDUAL
    SHIFT_ptr,  # (B, D) row stride stride_shift
    SCALE_ptr,  # (B, D) row stride stride_scale
    X_NEW_ptr,  # (M, D) contiguous, x + gate * y; written only when HAS_RESIDUAL
    H_ptr,  # (M, D) contiguous, the modulated norm
    MEAN_ptr,  # (M,) fp32 (fp64 for fp64 inputs)
    RSTD_ptr,  # (M,) same dtype as MEAN
    D,
    T,
    n_chunks,
    rows_per_chunk,
    stride_x,
    stride_y,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per loop iteration
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # loads of this many tiles in flight (cp.async into shared memory on the GPU)
):
    compute = tl.float64 if X_ptr.dtype.element_ty == tl.float64 else tl.float32
    # One program per (sample, chunk of its rows), chunk fastest: programs running together touch neighbouring rows.
    pid = tl.program_id(0)
    sample = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    first_row = sample * T + chunk * rows_per_chunk  # int64
    n_rows = tl.minimum(rows_per_chunk, T - chunk * rows_per_chunk)  # rows of this sample in this chunk
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    # This sample's modulation, loaded once: (BLOCK_D,) each.
    shift = tl.load(SHIFT_ptr + sample * stride_shift + cols, mask=col_ok, other=0.0).to(compute)
    gain = 1.0 + tl.load(SCALE_ptr + sample * stride_scale + cols, mask=col_ok, other=0.0).to(compute)
    if HAS_RESIDUAL:
        gate = tl.load(GATE_ptr + sample * stride_gate + cols, mask=col_ok, other=0.0).to(compute)

    for tile_start in tl.range(0, n_rows, ROWS, num_stages=NUM_STAGES):
        local = tile_start + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = local < n_rows
        rows = first_row + local  # (ROWS,) int64
        mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_D)
        out_offsets = rows[:, None] * D + cols[None, :]  # (ROWS, BLOCK_D) into the contiguous outputs
        x = tl.load(X_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(compute)
        if HAS_RESIDUAL:
            y = tl.load(Y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(compute)
            x_new = (x + gate[None, :] * y).to(X_NEW_ptr.dtype.element_ty)
            tl.store(X_NEW_ptr + out_offsets, x_new, mask=mask)
            x = x_new.to(compute)  # normalise the stored (rounded) x_new, the tensor the backward sees
        mean = tl.sum(x, axis=1) / D  # (ROWS,)
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)  # (ROWS,)
        h = centered * rstd[:, None] * gain[None, :] + shift[None, :]
        tl.store(H_ptr + out_offsets, h.to(H_ptr.dtype.element_ty), mask=mask)
        tl.store(MEAN_ptr + rows, mean.to(MEAN_ptr.dtype.element_ty), mask=row_ok)
        tl.store(RSTD_ptr + rows, rstd.to(RSTD_ptr.dtype.element_ty), mask=row_ok)


# Sizes that vary with B and T are not specialised on (divisibility), so one compiled variant serves all.
@triton.jit(do_not_specialize=["T", "n_chunks", "rows_per_chunk"])
def _ln_modulate_bwd_kernel(
    DH_ptr,  # (M, D) grad of h, row stride stride_dh
    DX_NEW_ptr,  # (M, D) grad of x_new, row stride stride_dx_new; read only when HAS_RESIDUAL
    X_ptr,  # (M, D) the normalised input (x, or the saved x_new when HAS_RESIDUAL), row stride stride_x
    Y_ptr,  # (M, D) row stride stride_y; read only when HAS_RESIDUAL
    GATE_ptr,  # (B, D) row stride stride_gate; read only when HAS_RESIDUAL
    SCALE_ptr,  # (B, D) row stride stride_scale
    MEAN_ptr,  # (M,)
    RSTD_ptr,  # (M,)
    DX_ptr,  # (M, D) contiguous
    DY_ptr,  # (M, D) contiguous; written only when HAS_RESIDUAL
    DSHIFT_PART_ptr,  # (B, n_chunks, D) contiguous partial sums over a chunk's rows
    DSCALE_PART_ptr,  # (B, n_chunks, D)
    DGATE_PART_ptr,  # (B, n_chunks, D); written only when HAS_RESIDUAL
    D,
    T,
    n_chunks,
    rows_per_chunk,
    stride_dh,
    stride_dx_new,
    stride_x,
    stride_y,
    stride_gate,
    stride_scale,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per loop iteration
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # loads of this many tiles in flight (cp.async into shared memory on the GPU)
):
    compute = tl.float64 if X_ptr.dtype.element_ty == tl.float64 else tl.float32
    # One program per (sample, chunk of its rows), chunk fastest: programs running together touch neighbouring rows.
    pid = tl.program_id(0)
    sample = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    first_row = sample * T + chunk * rows_per_chunk  # int64
    n_rows = tl.minimum(rows_per_chunk, T - chunk * rows_per_chunk)  # rows of this sample in this chunk
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D

    gain = 1.0 + tl.load(SCALE_ptr + sample * stride_scale + cols, mask=col_ok, other=0.0).to(compute)  # (BLOCK_D,)
    dshift_acc = tl.zeros([BLOCK_D], dtype=compute)
    dscale_acc = tl.zeros([BLOCK_D], dtype=compute)
    if HAS_RESIDUAL:
        gate = tl.load(GATE_ptr + sample * stride_gate + cols, mask=col_ok, other=0.0).to(compute)  # (BLOCK_D,)
        dgate_acc = tl.zeros([BLOCK_D], dtype=compute)

    for tile_start in tl.range(0, n_rows, ROWS, num_stages=NUM_STAGES):
        local = tile_start + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = local < n_rows
        rows = first_row + local  # (ROWS,) int64
        mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_D)
        x = tl.load(X_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(compute)
        dh = tl.load(DH_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(compute)
        mean = tl.load(MEAN_ptr + rows, mask=row_ok, other=0.0).to(compute)  # (ROWS,)
        rstd = tl.load(RSTD_ptr + rows, mask=row_ok, other=0.0).to(compute)  # (ROWS,)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dh * gain[None, :]
        mean_dxhat = tl.sum(dxhat, axis=1) / D  # (ROWS,)
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D  # (ROWS,)
        dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
        dshift_acc += tl.sum(dh, axis=0)
        dscale_acc += tl.sum(dh * xhat, axis=0)

        out_offsets = rows[:, None] * D + cols[None, :]
        if HAS_RESIDUAL:
            dx_new = tl.load(DX_NEW_ptr + rows[:, None] * stride_dx_new + cols[None, :], mask=mask, other=0.0)
            dx += dx_new.to(compute)  # total grad of x_new = the residual input x's grad
            y = tl.load(Y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(compute)
            tl.store(DY_ptr + out_offsets, (dx * gate[None, :]).to(DY_ptr.dtype.element_ty), mask=mask)
            dgate_acc += tl.sum(dx * y, axis=0)
        tl.store(DX_ptr + out_offsets, dx.to(DX_ptr.dtype.element_ty), mask=mask)

    part_offsets = pid.to(tl.int64) * D + cols  # (BLOCK_D,): row (sample, chunk) of the (B, n_chunks, D) partials
    tl.store(DSHIFT_PART_ptr + part_offsets, dshift_acc.to(DSHIFT_PART_ptr.dtype.element_ty), mask=col_ok)
    tl.store(DSCALE_PART_ptr + part_offsets, dscale_acc.to(DSCALE_PART_ptr.dtype.element_ty), mask=col_ok)
    if HAS_RESIDUAL:
        tl.store(DGATE_PART_ptr + part_offsets, dgate_acc.to(DGATE_PART_ptr.dtype.element_ty), mask=col_ok)


# Under TRITON_INTERPRET=1 triton.jit returns an InterpretedFunction: it runs eagerly on CPU tensors, and
# wrap_triton rejects it before torch 2.13, so the launchers call it directly (no torch.compile on CPU).
RUNS_IN_INTERPRETER = isinstance(_ln_modulate_fwd_kernel, InterpretedFunction)


def _block_d(D: int) -> int:
    block_d = triton.next_power_of_2(D)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"ln_modulate supports D <= {MAX_BLOCK_D} (one row per register tile); got D={D}")
    return block_d


def _default_config(M: int, D: int, tile_elements: int, elements_per_thread: int, programs: int, stages: int):
    """The rule of the module docstring: (ROWS, BLOCK_D) tiles of about tile_elements, num_warps for about
    elements_per_thread of each tile tensor per thread, and about `programs` programs."""
    block_d = _block_d(D)
    rows = max(1, tile_elements // block_d)
    num_warps = min(16, max(4, triton.next_power_of_2(rows * block_d // (32 * elements_per_thread))))
    rows_per_chunk = max(rows, min(MAX_CHUNK, triton.next_power_of_2(triton.cdiv(M, programs))))
    return LaunchConfig(rows, num_warps, rows_per_chunk, stages)


def forward_config(M: int, D: int) -> LaunchConfig:
    """The forward's default launch config for M rows of width D."""
    return _default_config(M, D, FWD_TILE_ELEMENTS, FWD_ELEMENTS_PER_THREAD, FWD_PROGRAMS, FWD_STAGES)


def backward_config(M: int, D: int) -> LaunchConfig:
    """The backward's default launch config for M rows of width D."""
    return _default_config(M, D, BWD_TILE_ELEMENTS, BWD_ELEMENTS_PER_THREAD, BWD_PROGRAMS, BWD_STAGES)


def _chunking(T: int, config: LaunchConfig, tile_bytes_per_row: int) -> tuple[int, int, int, int]:
    """(rows, rows_per_chunk, n_chunks, num_stages) of a config applied to samples of T rows: tiles of at most
    next_power_of_2(T) rows, whole tiles per chunk, and the pipeline depth cut so that the tiles in flight
    ((num_stages - 1) * rows * tile_bytes_per_row of shared memory) stay within PIPELINE_BYTES."""
    rows_per_chunk = min(config.rows_per_chunk, triton.next_power_of_2(T))
    rows = min(config.rows, rows_per_chunk)
    rows_per_chunk = triton.cdiv(rows_per_chunk, rows) * rows
    stages = max(1, config.num_stages)
    while stages > 1 and (stages - 1) * rows * tile_bytes_per_row > PIPELINE_BYTES:
        stages -= 1
    return rows, rows_per_chunk, triton.cdiv(T, rows_per_chunk), stages


def _as_rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """View a (B, T, D) tensor as (B*T, D) rows with unit column stride, copying only if that is impossible."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, D)  # (M, D): a view unless the rows are not evenly strided


def _check_inputs(x: torch.Tensor, per_sample: dict, same_as_x: dict) -> None:
    """Raise a ValueError/TypeError naming the first input whose shape, dtype or device does not fit x."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    B, T, D = x.shape
    expected = {**{name: (B, D) for name in per_sample}, **{name: (B, T, D) for name in same_as_x}}
    for name, tensor in {**per_sample, **same_as_x}.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match x {tuple(x.shape)}; got {tuple(tensor.shape)}"
            )
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype}; expected x's dtype {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}; expected x's device {x.device}")


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """A (B, D) modulation tensor with unit column stride (the chunk(6, dim=1) views already have it)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _forward(x, y, gate, shift, scale, eps, config: LaunchConfig | None = None):
    """Launch the forward kernel; y and gate are None for plain ln_modulate. Returns (x_new, h, mean, rstd).

    config overrides the default launch config (`forward_config`); its rows are capped at T.
    """
    B, T, D = x.shape
    M = B * T
    block_d = _block_d(D)
    config = config or forward_config(M, D)
    # Pipelined loads per row: x (and y).
    row_bytes = block_d * x.element_size() * (2 if y is not None else 1)
    rows, rows_per_chunk, n_chunks, stages = _chunking(T, config, row_bytes)
    has_residual = y is not None
    # Without the residual, the residual-only pointer slots get some existing tensor the kernel never touches.
    x2 = _as_rows(x, D)  # (M, D)
    y2 = _as_rows(y, D) if has_residual else x2  # (M, D)
    gate = _per_sample(gate) if has_residual else shift  # (B, D)
    shift, scale = _per_sample(shift), _per_sample(scale)  # (B, D)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.empty((B, T, D), dtype=x.dtype, device=x.device)  # (B, T, D)
    x_new = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if has_residual else h  # (B, T, D)
    mean = torch.empty((M,), dtype=stats_dtype, device=x.device)  # (M,)
    rstd = torch.empty((M,), dtype=stats_dtype, device=x.device)  # (M,)
    kernel = _ln_modulate_fwd_kernel if RUNS_IN_INTERPRETER else wrap_triton(_ln_modulate_fwd_kernel)
    kernel[(B * n_chunks,)](
        x2, y2, gate, shift, scale, x_new, h, mean, rstd,
        D, T, n_chunks, rows_per_chunk,
        x2.stride(0), y2.stride(0), gate.stride(0), shift.stride(0), scale.stride(0),
        eps,
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK_D=block_d, NUM_STAGES=stages,
        num_warps=config.num_warps,
    )  # fmt: skip
    return x_new, h, mean, rstd


def _backward(grad_h, grad_x_new, x, y, gate, scale, mean, rstd, config: LaunchConfig | None = None):
    """Launch the backward kernel and finish the per-sample sums; residual-only arguments are None otherwise.

    config overrides the default launch config (`backward_config`). Returns (dx, dy, dgate, dshift, dscale),
    with dy and dgate None without the residual.
    """
    B, T, D = x.shape
    M = B * T
    block_d = _block_d(D)
    config = config or backward_config(M, D)
    # Pipelined loads per row: x, grad_h (and grad_x_new, y).
    row_bytes = block_d * x.element_size() * (4 if y is not None else 2)
    rows, rows_per_chunk, n_chunks, stages = _chunking(T, config, row_bytes)
    has_residual = y is not None
    # Without the residual, the residual-only pointer slots get some existing tensor the kernel never touches.
    grad_h2, x2 = _as_rows(grad_h, D), _as_rows(x, D)  # (M, D)
    grad_x_new2 = _as_rows(grad_x_new, D) if has_residual else grad_h2  # (M, D)
    y2 = _as_rows(y, D) if has_residual else x2  # (M, D)
    scale = _per_sample(scale)  # (B, D)
    gate = _per_sample(gate) if has_residual else scale  # (B, D)
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)  # (B, T, D)
    dy = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if has_residual else dx  # (B, T, D)
    part_dtype = mean.dtype  # fp32 partial sums (fp64 for fp64 inputs)
    dshift_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device)  # (B, n_chunks, D)
    dscale_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device)  # (B, n_chunks, D)
    dgate_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device) if has_residual else dshift_part
    kernel = _ln_modulate_bwd_kernel if RUNS_IN_INTERPRETER else wrap_triton(_ln_modulate_bwd_kernel)
    kernel[(B * n_chunks,)](
        grad_h2, grad_x_new2, x2, y2, gate, scale, mean, rstd,
        dx, dy, dshift_part, dscale_part, dgate_part,
        D, T, n_chunks, rows_per_chunk,
        grad_h2.stride(0), grad_x_new2.stride(0), x2.stride(0), y2.stride(0), gate.stride(0), scale.stride(0),
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK_D=block_d, NUM_STAGES=stages,
        num_warps=config.num_warps,
    )  # fmt: skip
    dshift = dshift_part.sum(1).to(x.dtype)  # (B, D)
    dscale = dscale_part.sum(1).to(x.dtype)  # (B, D)
    if not has_residual:
        return dx, None, None, dshift, dscale
    return dx, dy, dgate_part.sum(1).to(x.dtype), dshift, dscale


@triton_op("dit_fast::ln_modulate", mutates_args=())
def _ln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, mean, rstd) for x (B, T, D) and per-sample shift, scale (B, D); mean, rstd are (B*T,) fp32."""
    _check_inputs(x, {"shift": shift, "scale": scale}, {})
    _, h, mean, rstd = _forward(x, None, None, shift, scale, eps)
    return h, mean, rstd


@triton_op("dit_fast::ln_modulate_backward", mutates_args=())
def _ln_modulate_backward_op(
    grad_h: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dshift, dscale) of ln_modulate."""
    dx, _, _, dshift, dscale = _backward(grad_h, None, x, None, None, scale, mean, rstd)
    return dx, dshift, dscale


@triton_op("dit_fast::gated_residual_ln_modulate", mutates_args=())
def _gated_residual_ln_modulate_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new, h, mean, rstd): x_new = x + gate * y and h = ln_modulate(x_new, shift, scale)."""
    _check_inputs(x, {"gate": gate, "shift": shift, "scale": scale}, {"y": y})
    return _forward(x, y, gate, shift, scale, eps)


@triton_op("dit_fast::gated_residual_ln_modulate_backward", mutates_args=())
def _gated_residual_ln_modulate_backward_op(
    grad_x_new: torch.Tensor,
    grad_h: torch.Tensor,
    x_new: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dgate, dshift, dscale) of gated_residual_ln_modulate."""
    return _backward(grad_h, grad_x_new, x_new, y, gate, scale, mean, rstd)


def _ln_modulate_setup_context(ctx, inputs, output):
    x, _, scale, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)


def _ln_modulate_backward(ctx, grad_h, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _ln_modulate_backward_op(grad_h, x, scale, mean, rstd)
    return dx, dshift, dscale, None


def _gated_residual_ln_modulate_setup_context(ctx, inputs, output):
    _, y, gate, _, scale, _ = inputs
    x_new, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)


def _gated_residual_ln_modulate_backward(ctx, grad_x_new, grad_h, _grad_mean, _grad_rstd):
    x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _gated_residual_ln_modulate_backward_op(
        grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd
    )
    return dx, dy, dgate, dshift, dscale, None


_ln_modulate_op.register_autograd(_ln_modulate_backward, setup_context=_ln_modulate_setup_context)
_gated_residual_ln_modulate_op.register_autograd(
    _gated_residual_ln_modulate_backward, setup_context=_gated_residual_ln_modulate_setup_context
)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x (B, T, D), shift and scale (B, D) per sample. Returns (B, T, D)."""
    h, _, _ = _ln_modulate_op(x, shift, scale, eps)
    return h


def gated_residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h) with x_new = x + gate * y and h = ln_modulate(x_new, shift, scale, eps), in one pass."""
    x_new, h, _, _ = _gated_residual_ln_modulate_op(x, y, gate, shift, scale, eps)
    return x_new, h


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch ln_modulate, as DiT writes it: modulate(norm(x), shift, scale)."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)  # (B, T, D)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_ln_modulate_ref(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch gated_residual_ln_modulate: the residual update, then ln_modulate of its result."""
    x_new = x + gate.unsqueeze(1) * y  # (B, T, D)
    return x_new, ln_modulate_ref(x_new, shift, scale, eps)
