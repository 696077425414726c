"""GPU sampling of DiT-XL/2 with random weights: the fast path against the reference, CUDA-graph steps against
eager ones, and the Pipeline end to end."""

import pytest
import torch

from bench.sampling import random_state
from dit_fast import Pipeline, create_model
from dit_fast.diffusion.fast_sampling import SamplerLoop
from tests.tolerance import max_abs_err

pytestmark = pytest.mark.gpu

MODEL = "DiT-XL/2"
BATCH = 4
BF16_ATOL = 1e-2


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    """DiT-XL/2 with every weight random (init leaves the adaLN-Zero gates at zero, an identity body)."""
    return random_state()  # bench/sampling.py's weights


def build(state: dict[str, torch.Tensor], fused: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The reference (math attention) or the fast path (auto attention) with `state`, on the GPU in `dtype`."""
    with torch.device("cuda"):
        model = create_model(MODEL, fused=fused, attn="auto" if fused else "math")
    model.load_state_dict(state)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cuda").manual_seed(seed)
    x_T = torch.randn(BATCH, 4, 32, 32, device="cuda", generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), device="cuda", generator=generator)
    step_noise = torch.randn(BATCH, steps, 4, 32, 32, device="cuda", generator=generator)
    return x_T, labels, step_noise


def test_fast_path_matches_reference_ddim(reference_state):
    """Three-way rule on the latents after 5 DDIM steps: err(fast bf16) <= 2 err(reference bf16) + atol.

    The same-dtype reference holds bf16 weights, so its residual stream is bf16 like the fast path's (under
    autocast with fp32 weights the reference would keep an fp32 residual stream: a different precision).
    """
    x_T, labels, _ = inputs(5)
    ref32 = SamplerLoop(build(reference_state, fused=False), "ddim", 5, 4.0, precision="fp32").run(x_T, labels)
    reference_bf16 = build(reference_state, fused=False, dtype=torch.bfloat16)
    ref_bf16 = SamplerLoop(reference_bf16, "ddim", 5, 4.0, precision="bf16").run(x_T, labels)
    del reference_bf16
    fast = build(reference_state, fused=True, dtype=torch.bfloat16)
    out = SamplerLoop(fast, "ddim", 5, 4.0, precision="bf16", cuda_graph=True).run(x_T, labels)
    assert torch.isfinite(out).all()
    err, err_reference = max_abs_err(out, ref32), max_abs_err(ref_bf16, ref32)
    assert err <= 2 * err_reference + BF16_ATOL, f"fast {err:.3e} vs reference bf16 {err_reference:.3e}"


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_steps_equal_eager_steps(reference_state, fused):
    model = build(reference_state, fused=fused, dtype=torch.bfloat16 if fused else torch.float32)
    x_T, labels, step_noise = inputs(6, seed=1)
    eager = SamplerLoop(model, "ddpm", 6, 4.0, precision="bf16")
    graphed = SamplerLoop(model, "ddpm", 6, 4.0, precision="bf16", cuda_graph=True)
    for loop in (eager, graphed):
        loop.prepare(x_T, labels, step_noise)
        loop.step()
    torch.testing.assert_close(graphed.buffers.x, eager.buffers.x, rtol=1e-3, atol=1e-3)  # one step
    torch.testing.assert_close(
        graphed.run(x_T, labels, step_noise), eager.run(x_T, labels, step_noise), rtol=1e-3, atol=1e-3
    )
    # a smaller batch replays the captured graph, padded
    torch.testing.assert_close(
        graphed.run(x_T[:3], labels[:3], step_noise[:3]),
        eager.run(x_T[:3], labels[:3], step_noise[:3]),
        rtol=1e-3,
        atol=1e-3,
    )
    assert graphed.buffers.batch_size == BATCH


def test_pipeline_on_cuda_is_deterministic(reference_state):
    pipe = Pipeline(build(reference_state, fused=True))
    assert pipe.cuda_graph and pipe.precision == "bf16"
    assert next(pipe.model.parameters()).dtype == torch.bfloat16  # the fast path computes in its weights' dtype
    first = pipe([207, "otter", 3], num_inference_steps=10, output_type="latent", progress=False,
                 generator=torch.Generator("cuda").manual_seed(0))  # fmt: skip
    again = pipe([207, "otter", 3], num_inference_steps=10, output_type="latent", progress=False,
                 generator=torch.Generator("cuda").manual_seed(0))  # fmt: skip
    assert first.shape == (3, 4, 32, 32) and torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
