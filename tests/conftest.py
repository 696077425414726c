"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present; GPU tests say why they skip."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def interpreter_rounds_bf16_like_the_gpu(monkeypatch):
    """Under TRITON_INTERPRET=1, make fp32 -> bf16 casts round to nearest even, as the GPU does.

    The interpreter truncates them (triton 3.x `cast_impl`), which puts up to 1 ulp of error on every bf16
    output: twice what the GPU's cvt.rn.bf16.f32 gives, and enough to fail the three-way bound at random.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np  # triton is imported here, after TRITON_INTERPRET is set above
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncating_cast(self, src, dst_type)
        data = np.asarray(src.data, dtype=np.float32)
        bits = data.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(data), np.uint16(0x7FC0), rounded)
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", rounding_cast)
