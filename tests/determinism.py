"""Bit-identical backward passes: the check every fast op's tests run (no atomics, fixed reduction order)."""
from collections.abc import Callable

import torch


def assert_backward_deterministic(op: Callable, inputs: dict[str, torch.Tensor]) -> None:
    """Two backward passes of op(*inputs.values()) with the same cotangents give bit-identical gradients."""
    leaves = [t.detach().requires_grad_() for t in inputs.values()]
    outputs = op(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = [torch.randn_like(o) for o in outputs]
    first = torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True)
    second = torch.autograd.grad(outputs, leaves, cotangents)
    for name, a, b in zip(inputs, first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"
