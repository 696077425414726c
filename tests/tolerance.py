"""The three-way tolerance rule (shared/DESIGN.md section 3) used by every fast-op test.

err(op, ref32) <= 2 * err(torch_same_dtype, ref32) + atol[dtype], where ref32 is computed in fp32
(fp64 on the CPU) from the same inputs and torch_same_dtype is the plain PyTorch op run in the op's dtype.
"""
import torch

ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.isnan(a).any():
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def assert_three_way(out: torch.Tensor, ref32: torch.Tensor, same_dtype: torch.Tensor, name: str = "output") -> None:
    """Fail unless `out` is as close to `ref32` as twice PyTorch's own same-dtype result, plus atol."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or poisoned output?)"
    err = max_abs_err(out, ref32)
    err_torch = max_abs_err(same_dtype, ref32)
    bound = 2 * err_torch + ATOL[out.dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch {out.dtype} error {err_torch:.3e})"
