"""The fast DiT-XL/2 against the reference on the GPU: fp32 equality, bf16 three-way rule, compiled blocks."""
import pytest
import torch
import torch.nn.functional as F

from dit_fast import create_diffusion, create_model
from dit_fast.fused_blocks import FusedMlp
from tests.random_weights import randomize
from tests.tolerance import assert_three_way

pytestmark = pytest.mark.gpu
MODEL = "DiT-XL/2"


@pytest.fixture(scope="module")
def weights():
    """Random DiT-XL/2 weights (adaLN gates and final layer non-zero), on the CPU in fp32."""
    return randomize(create_model(MODEL), std=0.02).state_dict()


def build(weights, fused, dtype, attn=None):
    model = create_model(MODEL, fused=fused, attn=attn or ("auto" if fused else "math")).eval()
    model.load_state_dict(weights)
    return model.to("cuda", dtype)


def make_inputs(n=2, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, 4, 32, 32, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (n,), device="cuda", generator=gen)
    y = torch.randint(0, 1000, (n,), device="cuda", generator=gen)
    return x, t, y


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("hoist", [True, False])
def test_fp32_forward_equal(weights, hoist):
    ref, fast = build(weights, False, torch.float32), build(weights, True, torch.float32)
    fast.hoist_modulation = hoist
    x, t, y = make_inputs()
    with torch.no_grad():
        assert rel_err(fast(x, t, y), ref(x, t, y)) < 1e-5


def test_bf16_forward_and_gradients_three_way(weights):
    ref64, ref_bf16 = build(weights, False, torch.float64), build(weights, False, torch.bfloat16)
    fast = build(weights, True, torch.bfloat16)
    x, t, y = make_inputs(seed=1)
    probe = torch.randn(2, 8, 32, 32, device="cuda", dtype=torch.float64)
    outs = {}
    for name, model in (("ref64", ref64), ("bf16", ref_bf16), ("fast", fast)):
        dtype = torch.float32 if name == "fast" else next(model.parameters()).dtype
        out = model(x.to(dtype), t, y)
        (out.double() * probe).sum().backward()
        outs[name] = out
    assert_three_way(outs["fast"].bfloat16(), outs["ref64"], outs["bf16"], "forward")
    params = {name: dict(m.named_parameters()) for name, m in (("ref64", ref64), ("bf16", ref_bf16), ("fast", fast))}
    for key, p in params["ref64"].items():
        if p.requires_grad:
            assert_three_way(params["fast"][key].grad, p.grad, params["bf16"][key].grad, f"grad {key}")


@pytest.mark.parametrize("hoist", [True, False])
def test_compiled_blocks_fullgraph_match_eager(weights, hoist):
    """compile_blocks uses fullgraph=True, so any graph break is an error; outputs and grads match eager."""
    eager, compiled = build(weights, True, torch.bfloat16), build(weights, True, torch.bfloat16)
    eager.hoist_modulation = compiled.hoist_modulation = hoist
    compiled.compile_blocks()
    x, t, y = make_inputs(n=4, seed=2)
    out_e, out_c = eager(x, t, y), compiled(x, t, y)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    assert rel_err(out_c, out_e) < 1e-2
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        if pe.requires_grad:
            assert rel_err(pc.grad, pe.grad) < 5e-2, name


def test_gelu_epilogue_matches_tanh_gelu():
    mlp = FusedMlp(1152, 4608).cuda().to(torch.bfloat16)
    x = torch.randn(4, 256, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = mlp(x)
        ref32 = F.linear(F.gelu(F.linear(x.float(), mlp.fc1.weight.float(), mlp.fc1.bias.float()), approximate="tanh"),
                         mlp.fc2.weight.float(), mlp.fc2.bias.float())
        same = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert_three_way(fused, ref32, same, "mlp with GELU epilogue")


def test_same_weights_sample_the_same_images(weights):
    """Official-format weights in both paths: DDIM from the same noise lands on the same latents (bf16 rule)."""
    ref32, ref_bf16 = build(weights, False, torch.float32), build(weights, False, torch.bfloat16)
    fast = build(weights, True, torch.bfloat16)
    diffusion = create_diffusion("ddim10")
    z = torch.randn(4, 4, 32, 32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    kwargs = dict(y=torch.tensor([207, 360, 1000, 1000], device="cuda"), cfg_scale=4.0)
    samples = {}
    with torch.no_grad():
        for name, model in (("ref32", ref32), ("bf16", ref_bf16), ("fast", fast)):
            noise = z if name != "bf16" else z.bfloat16()
            samples[name] = diffusion.ddim_sample_loop(model.forward_with_cfg, z.shape, noise=noise, model_kwargs=kwargs)
    assert_three_way(samples["fast"].bfloat16(), samples["ref32"], samples["bf16"], "DDIM samples")


@pytest.mark.parametrize("name", ["DiT-S/4", "DiT-B/8", "DiT-S/2"])
def test_small_configs_match_reference(name):
    """Other widths, token counts and output widths (D 384/768, T 64/16/256, O 128/512/32) at a sampling
    batch: fp32 forward and every gradient equal the reference; bf16 forward within the three-way rule."""
    torch.manual_seed(0)
    ref = create_model(name).cuda().eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if pname != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.05)
    fast = create_model(name, fused=True).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    x, t, y = make_inputs(n=64, seed=4)
    probe = torch.randn(64, 8, 32, 32, device="cuda")
    out_ref, out_fast = ref(x, t, y), fast(x, t, y)
    assert rel_err(out_fast, out_ref) < 1e-5
    (out_ref * probe).sum().backward()
    (out_fast * probe).sum().backward()
    for (pname, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        if p_ref.requires_grad:
            assert rel_err(p_fast.grad, p_ref.grad) < 1e-4, pname
    ref64, ref_bf16 = ref.double(), create_model(name).cuda().eval()
    ref_bf16.load_state_dict(ref.state_dict())
    fast_bf16 = fast.to(torch.bfloat16)
    with torch.no_grad():
        out64 = ref64(x.double(), t, y)
        out_bf16 = ref_bf16.to(torch.bfloat16)(x.bfloat16(), t, y)
        assert_three_way(fast_bf16(x, t, y).bfloat16(), out64, out_bf16, f"{name} bf16 forward")
