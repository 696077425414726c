"""Fused adaLN modulation: LayerNorm (no affine, fp32 statistics) followed by `* (1 + scale) + shift`.

Two public ops share one forward and one backward kernel, switched by the `HAS_RESIDUAL` flag:
  ln_modulate(x, shift, scale)                      -> h = LN(x) * (1 + scale) + shift
  gated_residual_ln_modulate(x, y, gate, shift, scale) -> (x_new, h): x_new = x + gate * y, h = ln_modulate(x_new)
The second fuses the residual update of one DiT sub-block with the norm of the next one, one pass over the rows.

shift, scale and gate are per sample, (B, D), broadcast over the T tokens; kernels index them by `row // T`.
They may be the strided views that `mod.chunk(6, dim=1)` gives (row stride 6*D): only their last dim must
be contiguous, otherwise they are copied (B*D elements, cheap). x and y are (B, T, D); a last dim with
stride != 1 or rows that are not evenly strided costs one copy (`contiguous`).

Two kernel designs. Plain ln_modulate, forward and backward, runs kernels/ln_modulate_tma.py's TMA kernels
(rows fetched into shared memory by a pipelined loop: forward 91-97% of copy bandwidth on an H200, against
73-76% for the register-tile kernel below) whenever the rows fit their layout, and outside torch.compile.
Everything else runs the register-tile kernels of this file: gated_residual_ln_modulate, rows TMA cannot take,
and every call inside a compiled graph (ln_modulate_tma.can_use_tma says why).

Register-tile launch rule (`forward_config` / `backward_config`, chosen by bench/kernel_sweep.py on an H200 at
D = 1152, where it took the forward from 44% to 72-74% (plain) and 67% to 87-89% (residual) of copy bandwidth):
BLOCK_D = next_power_of_2(D), at most MAX_BLOCK_D = 8192 (D > 8192 is a ValueError). A tile is
ROWS = max(1, TILE // BLOCK_D) rows by BLOCK_D, with num_warps = ROWS * BLOCK_D / (32 * PER_THREAD), at
least 1 and at most 16, where (TILE, PER_THREAD) are, for the forward, (8192, 64) plain and (8192, 32) with
the residual, and, for the backward, (4096, 32) plain and (8192, 64) with the residual. At D = 1152 that
is 4 rows x 4 warps (plain forward), 4 x 8 (residual forward), 2 x 4 and 4 x 4 (backwards): more
bytes in flight per thread than one row per 8 warps, the old rule, which left the kernels latency bound.
A backward program reduces a chunk of about M / BACKWARD_PROGRAMS rows of one sample (plain 512, residual
1024 programs; a power of two, at most 256 rows): 64 and 32 rows at B*T = 32768.
When ROWS divides T, every tile lies in one sample and its shift/scale/gate are loaded once as vectors.
The forward streams its rows: evict-first loads and ".cs" stores (either hint alone did nothing): 2-3% with
the residual in an H200 sweep (0.0824 -> 0.0797 ms at B*T = 32768), 1-1.6% in bench/kernels.py (session 6).

Math is fp32 (fp64 when the inputs are fp64, so that gradcheck can run); mean and rstd are saved as fp32
(B*T,) for the backward, which recomputes xhat instead of saving it. The backward writes dshift, dscale
and dgate as fp32 per-chunk partial sums (B, n_chunks, D), each program owning a chunk of one sample's
rows; kernels/partial_sums.py's `sum_chunks` finishes them. No atomics, so gradients are bit-identical run to run.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launch import as_rows, launchable
from .ln_modulate_tma import TmaBackwardConfig, TmaConfig, backward_tma, can_use_tma, forward_tma, tma_backward_config
from .partial_sums import sum_chunks

MAX_BLOCK_D = 8192
# (TILE, PER_THREAD) of the launch rule, by (pass, has_residual); BACKWARD_PROGRAMS by has_residual.
LAUNCH_SHAPES = {("fwd", False): (8192, 64), ("fwd", True): (8192, 32), ("bwd", False): (4096, 32), ("bwd", True): (8192, 64)}
BACKWARD_PROGRAMS = {False: 512, True: 1024}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
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
    M,
    D,
    T,
    stride_x,
    stride_y,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS_SHARE_SAMPLE: tl.constexpr,  # T % ROWS == 0: every tile lies in one sample
):
    compute = tl.float64 if X_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) int64
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (rows < M)[:, None] & (cols < D)[None, :]  # (ROWS, BLOCK_D)
    out_offsets = rows[:, None] * D + cols[None, :]  # (ROWS, BLOCK_D) into the contiguous outputs
    if ROWS_SHARE_SAMPLE:  # T % ROWS == 0: one sample's (1, BLOCK_D) vectors, broadcast over the tile
        sample = (tl.program_id(0).to(tl.int64) * ROWS) // T
        per_sample = sample + tl.zeros([1], dtype=tl.int64)  # (1,)
        per_sample_mask = (cols < D)[None, :]  # (1, BLOCK_D)
    else:  # each row's own sample, (ROWS, BLOCK_D) gathers
        per_sample = rows // T  # (ROWS,)
        per_sample_mask = mask

    # Streaming hints (the rows are touched once here): loads evict first, stores bypass retention (".cs").
    x_ptrs = X_ptr + rows[:, None] * stride_x + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(compute)
    if HAS_RESIDUAL:
        y_ptrs = Y_ptr + rows[:, None] * stride_y + cols[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(compute)
        gate_ptrs = GATE_ptr + per_sample[:, None] * stride_gate + cols[None, :]
        gate = tl.load(gate_ptrs, mask=per_sample_mask, other=0.0).to(compute)
        x_new = (x + gate * y).to(X_NEW_ptr.dtype.element_ty)
        tl.store(X_NEW_ptr + out_offsets, x_new, mask=mask, cache_modifier=".cs")
        x = x_new.to(compute)  # normalise the stored (rounded) x_new, the tensor the backward sees

    mean = tl.sum(x, axis=1) / D  # (ROWS,)
    centered = tl.where(mask, x - mean[:, None], 0.0)
    # eps arrives as fp64 when Inductor launches the kernel (fp32 from a plain launch): cast it, or the whole
    # tile's normalisation would run in fp64, 1.8x slower on an H200.
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + tl.cast(eps, compute))  # (ROWS,)
    shift_ptrs = SHIFT_ptr + per_sample[:, None] * stride_shift + cols[None, :]
    scale_ptrs = SCALE_ptr + per_sample[:, None] * stride_scale + cols[None, :]
    shift = tl.load(shift_ptrs, mask=per_sample_mask, other=0.0).to(compute)
    scale = tl.load(scale_ptrs, mask=per_sample_mask, other=0.0).to(compute)
    h = centered * rstd[:, None] * (1.0 + scale) + shift
    tl.store(H_ptr + out_offsets, h.to(H_ptr.dtype.element_ty), mask=mask, cache_modifier=".cs")
    tl.store(MEAN_ptr + rows, mean.to(MEAN_ptr.dtype.element_ty), mask=rows < M)
    tl.store(RSTD_ptr + rows, rstd.to(RSTD_ptr.dtype.element_ty), mask=rows < M)


@triton.jit
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
    rows_per_chunk,
    stride_dh,
    stride_dx_new,
    stride_x,
    stride_y,
    stride_gate,
    stride_scale,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute = tl.float64 if X_ptr.dtype.element_ty == tl.float64 else tl.float32
    sample = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
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

    for tile_start in range(0, n_rows, ROWS):
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

    part_offsets = (sample * n_chunks + chunk) * D + cols  # (BLOCK_D,)
    tl.store(DSHIFT_PART_ptr + part_offsets, dshift_acc.to(DSHIFT_PART_ptr.dtype.element_ty), mask=col_ok)
    tl.store(DSCALE_PART_ptr + part_offsets, dscale_acc.to(DSCALE_PART_ptr.dtype.element_ty), mask=col_ok)
    if HAS_RESIDUAL:
        tl.store(DGATE_PART_ptr + part_offsets, dgate_acc.to(DGATE_PART_ptr.dtype.element_ty), mask=col_ok)


class LaunchConfig(NamedTuple):
    """How a kernel is launched: tiles of `rows` x BLOCK_D, `num_warps`, and (backward) rows per program."""

    rows: int
    num_warps: int
    rows_per_chunk: int = 0  # backward only: rows of one sample that one program reduces


def _block_d(D: int) -> int:
    """BLOCK_D = next_power_of_2(D); D > MAX_BLOCK_D is a ValueError."""
    block_d = triton.next_power_of_2(D)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"ln_modulate supports D <= {MAX_BLOCK_D} (one row per register tile); got D={D}")
    return block_d


def _tile(pass_: str, residual: bool, D: int) -> tuple[int, int]:
    """(ROWS, num_warps) of the launch rule for one pass."""
    block_d = _block_d(D)
    tile, per_thread = LAUNCH_SHAPES[(pass_, residual)]
    rows = max(1, tile // block_d)
    return rows, min(16, max(1, rows * block_d // (32 * per_thread)))


def forward_config(M: int, D: int, residual: bool) -> LaunchConfig:
    """The forward's launch rule (module docstring)."""
    return LaunchConfig(*_tile("fwd", residual, D))


def backward_config(M: int, D: int, residual: bool) -> LaunchConfig:
    """The backward's launch rule (module docstring)."""
    rows, num_warps = _tile("bwd", residual, D)
    chunk = triton.next_power_of_2(triton.cdiv(M, BACKWARD_PROGRAMS[residual]))
    return LaunchConfig(rows, num_warps, max(rows, min(256, chunk)))


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


def _forward(x, y, gate, shift, scale, eps, config: LaunchConfig | TmaConfig | None = None):
    """Launch a forward kernel; y and gate are None for plain ln_modulate. Returns (x_new, h, mean, rstd).

    Plain ln_modulate runs the TMA kernel (kernels/ln_modulate_tma.py) when its rows fit that kernel's layout;
    the residual variant, and rows TMA cannot take, run the register-tile kernel. `config` overrides the
    launch rule and, by its type, picks the kernel (bench/kernel_sweep.py times alternatives that way); a
    TmaConfig the TMA kernel cannot take is a ValueError.
    """
    B, T, D = x.shape
    M = B * T
    block_d = _block_d(D)
    has_residual = y is not None
    x2 = as_rows(x, D)  # (M, D)
    # Without the residual, the residual-only pointer slots get some existing tensor the kernel never touches.
    y2 = as_rows(y, D) if has_residual else x2  # (M, D)
    gate = _per_sample(gate) if has_residual else shift  # (B, D)
    shift, scale = _per_sample(shift), _per_sample(scale)  # (B, D)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.empty((B, T, D), dtype=x.dtype, device=x.device)  # (B, T, D)
    x_new = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if has_residual else h  # (B, T, D)
    mean = torch.empty((M,), dtype=stats_dtype, device=x.device)  # (M,)
    rstd = torch.empty((M,), dtype=stats_dtype, device=x.device)  # (M,)
    if not has_residual and (config is None or isinstance(config, TmaConfig)):
        h2 = h.view(M, D)
        if can_use_tma([x2, h2], D):
            forward_tma(x2, shift, scale, h2, mean, rstd, T, eps, config)
            return x_new, h, mean, rstd
        if config is not None:
            raise ValueError(f"a TmaConfig needs rows TMA can take; D={D} ({x.dtype}) or an alignment does not fit")
    if isinstance(config, TmaConfig):
        raise ValueError("gated_residual_ln_modulate has no TMA forward; pass a LaunchConfig")
    rows, num_warps, _ = config or forward_config(M, D, has_residual)
    kernel = launchable(_ln_modulate_fwd_kernel)
    kernel[(triton.cdiv(M, rows),)](
        x2, y2, gate, shift, scale, x_new, h, mean, rstd,
        M, D, T,
        x2.stride(0), y2.stride(0), gate.stride(0), shift.stride(0), scale.stride(0),
        eps,
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK_D=block_d, ROWS_SHARE_SAMPLE=T % rows == 0, num_warps=num_warps,
    )  # fmt: skip
    return x_new, h, mean, rstd


def _backward(
    grad_h, grad_x_new, x, y, gate, scale, mean, rstd, config: LaunchConfig | TmaBackwardConfig | None = None
):
    """Launch a backward kernel and finish the per-sample sums; residual-only arguments are None otherwise.

    Returns (dx, dy, dgate, dshift, dscale), with dy and dgate None without the residual. Plain ln_modulate
    runs the TMA kernel when its rows fit and its tiles divide T, as the forward; `config` overrides the
    launch rule and, by its type, picks the kernel.
    """
    B, T, D = x.shape
    M = B * T
    has_residual = y is not None
    grad_h2, x2 = as_rows(grad_h, D), as_rows(x, D)  # (M, D)
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)  # (B, T, D)
    tma_config = None
    if not has_residual and (config is None or isinstance(config, TmaBackwardConfig)):
        candidate = config or tma_backward_config(M, D)
        tiles_fit = T % candidate.rows == 0 and candidate.rows_per_chunk % candidate.rows == 0
        if tiles_fit and can_use_tma([grad_h2, x2, dx.view(M, D)], D):
            tma_config = candidate
        elif config is not None:
            raise ValueError(f"a TmaBackwardConfig needs rows TMA can take and tiles dividing T={T}; got {config}")
    elif isinstance(config, TmaBackwardConfig):
        raise ValueError("gated_residual_ln_modulate has no TMA backward; pass a LaunchConfig")
    if tma_config is not None:
        rows_per_chunk = tma_config.rows_per_chunk
    else:
        rows, num_warps, rows_per_chunk = config or backward_config(M, D, has_residual)
    n_chunks = triton.cdiv(T, rows_per_chunk)
    part_dtype = mean.dtype  # fp32 partial sums (fp64 for fp64 inputs)
    dshift_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device)  # (B, n_chunks, D)
    dscale_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device)  # (B, n_chunks, D)
    scale = _per_sample(scale)  # (B, D)
    if tma_config is not None:
        backward_tma(grad_h2, x2, scale, mean, rstd, dx.view(M, D), dshift_part, dscale_part, T, tma_config)
        dshift, dscale = sum_chunks([dshift_part, dscale_part], x.dtype)  # (B, D) each
        return dx, None, None, dshift, dscale
    # Without the residual, the residual-only pointer slots get some existing tensor the kernel never touches.
    grad_x_new2 = as_rows(grad_x_new, D) if has_residual else grad_h2  # (M, D)
    y2 = as_rows(y, D) if has_residual else x2  # (M, D)
    gate = _per_sample(gate) if has_residual else scale  # (B, D)
    dy = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if has_residual else dx  # (B, T, D)
    dgate_part = torch.empty((B, n_chunks, D), dtype=part_dtype, device=x.device) if has_residual else dshift_part
    kernel = launchable(_ln_modulate_bwd_kernel)
    kernel[(B, n_chunks)](
        grad_h2, grad_x_new2, x2, y2, gate, scale, mean, rstd,
        dx, dy, dshift_part, dscale_part, dgate_part,
        D, T, rows_per_chunk,
        grad_h2.stride(0), grad_x_new2.stride(0), x2.stride(0), y2.stride(0), gate.stride(0), scale.stride(0),
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK_D=_block_d(D), num_warps=num_warps,
    )  # fmt: skip
    if not has_residual:
        dshift, dscale = sum_chunks([dshift_part, dscale_part], x.dtype)  # (B, D) each
        return dx, None, None, dshift, dscale
    dshift, dscale, dgate = sum_chunks([dshift_part, dscale_part, dgate_part], x.dtype)  # (B, D) each
    return dx, dy, dgate, dshift, dscale


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
