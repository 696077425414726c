"""The sampling loop and the Pipeline API on DiT-debug (CPU): equal to the reference samplers, ids and names,
output types, generators, errors."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast import Pipeline, create_model
from dit_fast.diffusion import create_diffusion
from dit_fast.diffusion.fast_sampling import SamplerLoop, sampler_diffusion
from dit_fast.images import to_uint8
from dit_fast.pipeline import draw_noise, index_generators, uniform_labels
from tests.random_weights import randomize
from tests.test_vae import tiny_vae

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install diffusers)")


def random_debug_model(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """DiT-debug with every weight random (init leaves adaLN-Zero gates at zero: an identity network)."""
    return randomize(create_model("DiT-debug", num_classes=num_classes), seed).eval()


def reference_inputs(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 4, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return x_T, labels


@pytest.mark.parametrize("cfg_channels", [3, "all"])
def test_ddpm_loop_equals_reference_p_sample_loop(cfg_channels):
    model = random_debug_model()
    n, steps, scale = 3, 8, 4.0
    x_T, labels = reference_inputs(n)
    diffusion = create_diffusion(str(steps))
    doubled = torch.cat([x_T, x_T])
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    kwargs = dict(y=y, cfg_scale=scale, cfg_channels=cfg_channels)
    with torch.no_grad():
        reference = diffusion.p_sample_loop(
            model.forward_with_cfg,
            doubled.shape,
            noise=doubled,
            model_kwargs=kwargs,
            generator=torch.Generator().manual_seed(1),
        )[:n]
    replay = torch.Generator().manual_seed(1)  # the reference draws (2N, ...) noise per step, in step order
    step_noise = torch.stack([torch.randn(doubled.shape, generator=replay)[:n] for _ in range(steps)], dim=1)
    loop = SamplerLoop(model, "ddpm", steps, scale, cfg_channels, precision="fp32")
    torch.testing.assert_close(loop.run(x_T, labels, step_noise), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, x_T)


def test_ddim_loop_equals_reference_ddim_sample_loop():
    model = random_debug_model()
    n, steps = 2, 10
    x_T, labels = reference_inputs(n, seed=3)
    doubled = torch.cat([x_T, x_T])
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    with torch.no_grad():
        reference = create_diffusion(f"ddim{steps}").ddim_sample_loop(
            model.forward_with_cfg, doubled.shape, noise=doubled, model_kwargs=dict(y=y, cfg_scale=2.0)
        )[:n]
    loop = SamplerLoop(model, "ddim", steps, 2.0, precision="fp32")
    torch.testing.assert_close(loop.run(x_T, labels), reference, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_runs_the_conditional_half_only():
    model = random_debug_model()
    x_T, labels = reference_inputs(2, seed=4)
    with torch.no_grad():
        reference = create_diffusion("ddim5").ddim_sample_loop(model, x_T.shape, noise=x_T, model_kwargs=dict(y=labels))
    calls = []
    model.x_embedder.register_forward_pre_hook(lambda _module, args: calls.append(len(args[0])))
    out = SamplerLoop(model, "ddim", 5, cfg_scale=1.0).run(x_T, labels)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert calls == [2] * 5  # N forwards per step, not 2N


def test_fused_model_runs_the_same_loop():
    """The fast path (Triton ops; the CPU runs them in the interpreter) through the same loop as the reference."""
    reference = random_debug_model()
    fused = create_model("DiT-debug", fused=True)
    fused.load_state_dict(reference.state_dict())
    x_T, labels = reference_inputs(2, seed=6)
    expected = SamplerLoop(reference, "ddim", 3, 4.0).run(x_T, labels)
    torch.testing.assert_close(
        SamplerLoop(fused.eval(), "ddim", 3, 4.0).run(x_T, labels), expected, rtol=1e-4, atol=1e-4
    )


def test_loop_reuses_buffers_and_checks_shapes():
    loop = SamplerLoop(random_debug_model(), "ddpm", 4, 3.0)
    x_T, labels = reference_inputs(2)
    noise = torch.randn(2, 4, 4, 8, 8)
    first = loop.run(x_T, labels, noise)
    buffers = loop.buffers
    torch.testing.assert_close(loop.run(x_T, labels, noise), first, rtol=0, atol=0)
    assert loop.buffers is buffers
    with pytest.raises(ValueError, match=r"ddpm needs step_noise of shape \(2, 4, 4, 8, 8\), got None"):
        loop.run(x_T, labels)
    with pytest.raises(ValueError, match="must be"):
        loop.run(torch.randn(2, 4, 4, 4), labels, noise)


def test_bf16_autocast_close_to_fp32():
    model = random_debug_model()
    x_T, labels = reference_inputs(2, seed=5)
    fp32 = SamplerLoop(model, "ddim", 5, 4.0, precision="fp32").run(x_T, labels)
    bf16 = SamplerLoop(model, "ddim", 5, 4.0, precision="bf16").run(x_T, labels)
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert not torch.equal(bf16, fp32)


def test_draw_noise_single_and_per_image_generators():
    x_T, steps = draw_noise(torch.Generator().manual_seed(0), 3, (4, 8, 8), 5, torch.device("cpu"))
    assert x_T.shape == (3, 4, 8, 8) and steps.shape == (3, 5, 4, 8, 8)
    again = torch.Generator().manual_seed(0)
    torch.testing.assert_close(x_T, torch.randn(3, 4, 8, 8, generator=again))
    per_image, per_image_steps = draw_noise(index_generators(7, [5, 9], "cpu"), 2, (4, 8, 8), 5, torch.device("cpu"))
    alone, alone_steps = draw_noise(index_generators(7, [9], "cpu"), 1, (4, 8, 8), 5, torch.device("cpu"))
    torch.testing.assert_close(per_image[1:], alone, rtol=0, atol=0)
    torch.testing.assert_close(per_image_steps[1:], alone_steps, rtol=0, atol=0)
    assert draw_noise(None, 2, (4, 8, 8), 0, torch.device("cpu"))[1] is None


def test_uniform_labels_depend_on_seed_and_index_only():
    labels = uniform_labels(0, range(2000), 10)
    assert labels[500:510] == uniform_labels(0, range(500, 510), 10)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 150 and counts.max() < 250
    assert uniform_labels(1, range(20), 10) != labels[:20]


def test_pipeline_accepts_ids_and_imagenet_names():
    pipe = Pipeline(random_debug_model(num_classes=1000))
    common = dict(guidance_scale=4.0, num_inference_steps=6, sampler="ddim", output_type="latent", progress=False)
    by_name = pipe(["golden retriever", "otter", "Lesser Panda"], generator=torch.Generator().manual_seed(0), **common)
    by_id = pipe([207, 360, "387"], generator=torch.Generator().manual_seed(0), **common)
    assert by_name.shape == (3, 4, 8, 8)
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"unknown ImageNet class name 'golden retreiver'; did you mean 'golden retriever' \(207\)"
    ):
        pipe(["golden retreiver"], **common)
    with pytest.raises(ValueError, match=r"'crane' is ambiguous: it names 134 \(crane\); 517 \(crane\)"):
        pipe(["crane"], **common)


def test_pipeline_per_image_generators_make_images_independent_of_batching():
    pipe = Pipeline(random_debug_model())
    labels = [1, 2, 3, 4, 5]
    common = dict(num_inference_steps=5, output_type="latent", progress=False)
    whole = pipe(labels, generator=index_generators(0, range(5), "cpu"), batch_size=5, **common)
    split = pipe(labels, generator=index_generators(0, range(5), "cpu"), batch_size=2, **common)
    # the same noise; only the matmul blocking of another batch size rounds differently
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-4)
    last_two = pipe(labels[3:], generator=index_generators(0, [3, 4], "cpu"), **common)
    torch.testing.assert_close(last_two, whole[3:], rtol=1e-4, atol=1e-4)


def test_pipeline_errors():
    pipe = Pipeline(random_debug_model())
    with pytest.raises(ValueError, match="output_type 'pil' needs a VAE; this pipeline has none"):
        pipe([1])
    with pytest.raises(ValueError, match="unknown output_type 'jpeg'"):
        pipe([1], output_type="jpeg")
    with pytest.raises(ValueError, match=r"class label 10 is out of range: the model has 10 classes, ids in \[0, 10\)"):
        pipe([10], output_type="latent")
    with pytest.raises(ValueError, match="needs an ImageNet model"):
        pipe(["tench"], output_type="latent")
    with pytest.raises(ValueError, match="cfg scale 0.5 is out of range"):
        pipe([1], guidance_scale=0.5, output_type="latent")
    with pytest.raises(ValueError, match=r"sampling steps 1001 is out of range: choose an integer in \[1, 1000\]"):
        pipe([1], num_inference_steps=1001, output_type="latent")
    with pytest.raises(ValueError, match="got 1 generators for 2 class labels"):
        pipe([1, 2], generator=[torch.Generator()], output_type="latent")
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        Pipeline(random_debug_model(), device="cpu", cuda_graph=True)


@needs_diffusers
def test_pipeline_output_types():
    pipe = Pipeline(random_debug_model(), vae=tiny_vae())
    common = dict(num_inference_steps=4, sampler="ddim", progress=False)
    latents = pipe([1, 2], output_type="latent", generator=torch.Generator().manual_seed(0), **common)
    tensors = pipe([1, 2], output_type="pt", generator=torch.Generator().manual_seed(0), **common)
    pixels = pipe([1, 2], output_type="np", generator=torch.Generator().manual_seed(0), **common)
    images = pipe([1, 2], output_type="pil", generator=torch.Generator().manual_seed(0), **common)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    assert tensors.shape == (2, 3, 64, 64) and tensors.min() >= -1 and tensors.max() <= 1
    torch.testing.assert_close(tensors, pipe.vae.decode(latents))
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, to_uint8(tensors))
    assert [image.size for image in images] == [(64, 64)] * 2 and isinstance(images[0], Image.Image)
    np.testing.assert_array_equal(np.asarray(images[1]), pixels[1])
    assert pipe.timings["images"] == 2 and pipe.timings["decode_s"] > 0


@needs_diffusers
def test_from_checkpoint_with_vae_directory(tmp_path):
    model = random_debug_model()
    torch.save(model.state_dict(), tmp_path / "debug.pt")
    tiny_vae().autoencoder.save_pretrained(tmp_path / "vae")
    pipe = Pipeline.from_checkpoint(
        str(tmp_path / "debug.pt"), model="DiT-debug", vae=str(tmp_path / "vae"), device="cpu"
    )
    images = pipe(
        [3], num_inference_steps=3, sampler="ddim", progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert images[0].size == (64, 64)
    assert pipe.sampler_loop("ddim", 3, 4.0, 3) is pipe.sampler_loop("ddim", 3, 4.0, 3)


def test_sampler_diffusion_respacing():
    assert sampler_diffusion("ddpm", 250).num_timesteps == 250
    assert sampler_diffusion("ddim", 50).timestep_map.tolist() == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="no integer stride gives exactly 300 of 1000 steps"):
        sampler_diffusion("ddim", 300)
