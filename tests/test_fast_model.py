"""The fast DiT (fused=True) against the reference: same state_dict, same function (CPU: Triton interpreter)."""
import pytest
import torch

from dit_fast import create_diffusion, create_model, load_model
from dit_fast.model import BLOCK_CLASSES
from tests.random_weights import randomize
from tests.test_model import inputs
from tests.tolerance import assert_three_way


def pair(block="adaLN-Zero", seed=0):
    """A randomised reference model and a fast model holding the same weights, in eval mode (no label dropout)."""
    ref = randomize(create_model("DiT-debug", block=block), seed).eval()
    fast = create_model("DiT-debug", block=block, fused=True).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_same_state_dict_keys_and_shapes():
    ref, fast = pair()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    assert fast.hoist_modulation and not ref.hoist_modulation


@pytest.mark.parametrize("hoist", [True, False])
def test_fp32_forward_matches_reference(hoist):
    ref, fast = pair()
    fast.hoist_modulation = hoist
    x, t, y = inputs(ref.cfg, n=3)
    with torch.no_grad():
        assert rel_err(fast(x, t, y), ref(x, t, y)) < 1e-5


@pytest.mark.parametrize("block", [b for b in BLOCK_CLASSES if b != "adaLN-Zero"])
def test_other_variants_fp32_forward_and_backward(block):
    ref, fast = pair(block)
    x, t, y = inputs(ref.cfg, n=2)
    weight = torch.randn(2, 8, 8, 8)
    (ref(x, t, y) * weight).sum().backward()
    out = fast(x, t, y)
    assert rel_err(out, ref(x, t, y)) < 1e-5
    (out * weight).sum().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        if p_ref.requires_grad:
            assert rel_err(p_fast.grad, p_ref.grad) < 1e-4, name


@pytest.mark.parametrize("hoist", [True, False])
def test_bf16_forward_and_gradients_three_way(hoist):
    """bf16 fast model vs the fp64 reference, bounded by the bf16 reference's own error (three-way rule)."""
    ref, fast = pair(seed=3)
    fast.hoist_modulation = hoist
    ref64 = create_model("DiT-debug").double().eval()
    ref64.load_state_dict(ref.state_dict())
    ref_bf16 = ref.to(torch.bfloat16)
    fast = fast.to(torch.bfloat16)
    x, t, y = inputs(ref64.cfg, n=3, seed=5)
    weight = torch.randn(3, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    outs = {}
    for name, model, xin in (("ref64", ref64, x.double()), ("bf16", ref_bf16, x.bfloat16()), ("fast", fast, x)):
        out = model(xin, t, y)
        (out.double() * weight).sum().backward()
        outs[name] = out
    assert outs["fast"].dtype == torch.float32  # the fast path returns the input's dtype
    assert_three_way(outs["fast"].bfloat16(), outs["ref64"], outs["bf16"], "forward")
    grads = {name: dict(m.named_parameters()) for name, m in (("ref64", ref64), ("bf16", ref_bf16), ("fast", fast))}
    checked = 0
    for key, p in grads["ref64"].items():
        if p.requires_grad:
            assert_three_way(grads["fast"][key].grad, p.grad, grads["bf16"][key].grad, f"grad {key}")
            checked += 1
    assert checked == len([p for p in ref64.parameters() if p.requires_grad])


def test_hoisted_modulation_gradient_reaches_every_block():
    ref, fast = pair(seed=1)
    x, t, y = inputs(ref.cfg, n=2)
    fast(x, t, y).square().mean().backward()
    ref(x, t, y).square().mean().backward()
    for i in range(ref.cfg.depth):
        g_fast = fast.blocks[i].adaLN_modulation[1].weight.grad
        g_ref = ref.blocks[i].adaLN_modulation[1].weight.grad
        assert g_fast.abs().sum() > 0
        assert rel_err(g_fast, g_ref) < 1e-4
    assert rel_err(fast.final_layer.adaLN_modulation[1].bias.grad, ref.final_layer.adaLN_modulation[1].bias.grad) < 1e-4


def test_checkpoint_samples_the_same_on_both_paths(tmp_path):
    """An official-format file loaded into both paths gives the same DDIM samples from the same noise."""
    ref, _ = pair(seed=2)
    path = tmp_path / "DiT-debug.pt"
    torch.save(ref.state_dict(), path)
    ref = load_model("DiT-debug", path).eval()
    fast = load_model("DiT-debug", path, fused=True).eval()
    diffusion = create_diffusion("ddim5")
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(y=torch.tensor([1, 2, 10, 10]), cfg_scale=4.0)
    with torch.no_grad():
        a = diffusion.ddim_sample_loop(ref.forward_with_cfg, z.shape, noise=z, model_kwargs=kwargs)
        b = diffusion.ddim_sample_loop(fast.forward_with_cfg, z.shape, noise=z, model_kwargs=kwargs)
    assert rel_err(b, a) < 1e-4
