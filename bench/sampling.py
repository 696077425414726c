"""DiT-XL/2 256px sampling speed: one CFG sampler step at batch 64 (128 forwards), and a full 250-step batch.

A step is the whole DDPM sampler step -- forward_with_cfg on the doubled batch plus the update arithmetic
-- run by dit_fast.diffusion.fast_sampling.SamplerLoop, the loop sample.py uses. Configurations, same
process, same random weights and inputs:
  fp32+tf32           reference model, attn="sdpa", fp32 weights, TF32 matmuls: the original recipe
  bf16                reference, bf16 autocast, eager steps
  bf16+compile        reference, bf16 autocast, torch.compile(forward_with_cfg), eager steps
  fast-eager          fused model (Triton ops, bf16 weights, auto attention), eager steps
  fast                fused model, the whole step captured as one CUDA graph and replayed
  fast+compile+graph  fused model under torch.compile, step captured as a CUDA graph (not with --quick)
Per-step time: the median over 20 steps (10 with --quick) of CUDA-event time around each step (eager) or
graph replay, after warm-up; setup time (warm-up, compilation, graph capture; not the model build) apart.
Then a full 250-step DDPM batch of 64 through dit_fast.Pipeline on the fast path, with VAE decode timed
apart (a random-init SD KL-f8 AutoencoderKL when diffusers is installed), and diffusers' DiTPipeline with
random weights in its own format at the same batch, steps and dtype (DDPMScheduler), when importable
(not with --quick).
FLOPs per step: 2 x forward MACs x 128 images (dit_fast.flops); MFU against a bf16 matmul peak measured here.

    python -m bench.sampling [--quick] [--out PATH]
"""

import importlib.util
import statistics
import time

import torch

from bench.environment import back_to_back_ms, benchmark_main, environment, matmul_peak_tflops, require_cuda
from bench.gpu_monitor import GpuMonitor
from dit_fast.diffusion.fast_sampling import SamplerLoop
from dit_fast.flops import model_flops
from dit_fast.model import DiT, create_model
from dit_fast.pipeline import Pipeline, draw_noise, index_generators, uniform_labels
from dit_fast.vae import DECODE_BATCH_SIZE, LATENT_SCALE, SD_VAE_CONFIG, VAE

MODEL = "DiT-XL/2"
BATCH = 64  # images; the model sees 2 x 64 per step with guidance
STEPS = 250
CFG_SCALE = 4.0
TIMED_STEPS = 20
WARMUP_STEPS = 3
TARGETS = {"step_ms": 52.0, "full_batch_s": 14.0, "speedup_vs_compiled": 1.2, "speedup_vs_fp32": 3.5}
CONFIGS = {  # name: (fused, precision, compile, cuda_graph, in quick runs)
    "fp32+tf32": (False, "tf32", False, False, True),
    "bf16": (False, "bf16", False, False, True),
    "bf16+compile": (False, "bf16", True, False, True),
    "fast-eager": (True, "bf16", False, False, True),
    "fast": (True, "bf16", False, True, True),
    "fast+compile+graph": (True, "bf16", True, True, False),
}


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """DiT-XL/2 weights, all random (the paper's init zeroes the adaLN-Zero gates), on the GPU."""
    with torch.device("cuda"):
        model = create_model(MODEL, attn="sdpa")
    generator = torch.Generator("cuda").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, device="cuda", generator=generator) * 0.02)
    return model.state_dict()


def build_model(state: dict[str, torch.Tensor], fused: bool) -> DiT:
    """The reference (fp32 weights, SDPA as the original code through timm) or the fast path (bf16 weights)."""
    with torch.device("cuda"):
        model = create_model(MODEL, fused=fused, attn="auto" if fused else "sdpa")
    model.load_state_dict(state)
    return model.to(torch.bfloat16 if fused else torch.float32).eval().requires_grad_(False)


def batch_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_T (64, 4, 32, 32), labels (64,), per-step noise (64, 250, 4, 32, 32), on the GPU."""
    labels = torch.tensor(uniform_labels(seed, range(BATCH), 1000), device="cuda")
    x_T, step_noise = draw_noise(
        index_generators(seed, range(BATCH), "cuda"), BATCH, (4, 32, 32), STEPS, torch.device("cuda")
    )
    return x_T, labels, step_noise


def measure_steps(name: str, model: DiT, inputs: tuple, timed_steps: int, peak_tflops: float) -> dict:
    """Median ms of one sampler step for configuration `name`, plus setup time and peak memory."""
    fused, precision, compile, cuda_graph, _ = CONFIGS[name]
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    loop = SamplerLoop(model, "ddpm", STEPS, CFG_SCALE, 3, precision, cuda_graph=cuda_graph, compile=compile)
    loop.prepare(*inputs)  # with cuda_graph: warm-up steps, then capture
    for _ in range(WARMUP_STEPS):  # eager: compilation happens here
        loop.step()
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - began
    loop.prepare(*inputs)
    with GpuMonitor() as monitor:
        ms = statistics.median(back_to_back_ms(loop.step, timed_steps))
    flops = model_flops(model.cfg, batch_size=2 * BATCH)
    row = {
        "config": name,
        "fused": fused,
        "precision": precision,
        "compile": compile,
        "cuda_graph": cuda_graph,
        "step_ms": round(ms, 2),
        "img_per_s_250_steps": round(BATCH / (ms * STEPS / 1000), 2),
        "tflops": round(flops / ms / 1e9, 1),
        "mfu": round(flops / ms / 1e9 / peak_tflops, 4),
        "setup_s": round(setup_s, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "gpu_during": monitor.summary(),  # the SM clock differs between configs when the power cap bites
    }
    print(row, flush=True)
    return row


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def full_batch(model: DiT, inputs: tuple) -> dict:
    """A 250-step DDPM batch of 64 through the Pipeline (fast path, CUDA graph), VAE decode timed apart."""
    vae = VAE.random_sd("cuda") if diffusers_available() else None
    pipe = Pipeline(model, vae=vae, device="cuda", precision="bf16", cuda_graph=True)
    pipe.sampler_loop("ddpm", STEPS, CFG_SCALE, 3).prepare(*inputs)  # capture before timing
    if vae is not None:
        vae.decode(torch.randn(DECODE_BATCH_SIZE, 4, 32, 32, device="cuda"))  # kernels load, cuDNN settles
    torch.cuda.synchronize()
    labels = uniform_labels(1, range(BATCH), 1000)
    began = time.perf_counter()
    generators = index_generators(1, range(BATCH), "cuda")
    output_type = "latent" if vae is None else "np"
    with GpuMonitor() as monitor:
        pipe(labels, CFG_SCALE, STEPS, generators, output_type=output_type, batch_size=BATCH, progress=False)
    total_s = time.perf_counter() - began
    timings = pipe.timings
    row = {
        "images": BATCH,
        "steps": STEPS,
        "total_s": round(total_s, 2),
        "sampling_s": round(timings["sampling_s"], 2),
        "decode_s": round(timings["decode_s"], 2) if vae is not None else None,
        "noise_and_host_s": round(total_s - timings["sampling_s"] - timings["decode_s"], 2),
        "img_per_s": round(BATCH / total_s, 2),
        "sustained_step_ms": round(1000 * timings["sampling_s"] / STEPS, 2),
        "gpu_during": monitor.summary(),  # SM clock and power: the 250 steps run power-capped (bench/gpu_monitor.py)
        "note": "VAE: random-init SD KL-f8, bf16"
        if vae is not None
        else "diffusers not installed: decode not measured",
    }
    print(row, flush=True)
    return row


def diffusers_dit_pipeline(labels: list[int]) -> dict:
    """diffusers' DiTPipeline, DiT-XL/2 + SD VAE with random weights, bf16, DDPM 250 steps, batch 64, CFG 4."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    with torch.device("cuda"):
        transformer = DiTTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
        autoencoder = AutoencoderKL(**SD_VAE_CONFIG)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    pipe = DiTPipeline(
        transformer=transformer.to(torch.bfloat16), vae=autoencoder.to(torch.bfloat16), scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=labels, guidance_scale=CFG_SCALE, num_inference_steps=2, output_type="np")  # warm-up
    torch.cuda.synchronize()
    began = time.perf_counter()
    pipe(class_labels=labels, guidance_scale=CFG_SCALE, num_inference_steps=STEPS, output_type="np",
         generator=torch.Generator("cuda").manual_seed(0))  # fmt: skip
    total_s = time.perf_counter() - began
    latents = torch.randn(BATCH, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.no_grad():
        autoencoder.decode(latents / LATENT_SCALE)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - began
    row = {
        "total_s": round(total_s, 2),
        "decode_s": round(decode_s, 2),
        "step_ms": round(1000 * (total_s - decode_s) / STEPS, 2),
        "img_per_s": round(BATCH / total_s, 2),
    }
    print({"diffusers_dit_pipeline": row}, flush=True)
    return row


def run(quick: bool = False) -> dict:
    """Every configuration's step time, the full-batch run and diffusers when importable: the JSON-ready report."""
    require_cuda("bench/sampling.py")
    peak_tflops = matmul_peak_tflops()
    state = random_state()
    inputs = batch_inputs()
    timed_steps = 10 if quick else TIMED_STEPS
    rows, errors, full = [], {}, None
    for fused in (False, True):
        model = build_model(state, fused)
        for name, (config_fused, *_, in_quick) in CONFIGS.items():
            if config_fused != fused or (quick and not in_quick):
                continue
            try:
                rows.append(measure_steps(name, model, inputs, timed_steps, peak_tflops))
            except Exception as error:  # one configuration failing (e.g. compile) must not end the benchmark
                errors[name] = repr(error)
                print(f"{name}: {error!r}", flush=True)
            torch.cuda.empty_cache()
        if fused:
            try:
                full = full_batch(model, inputs)
            except Exception as error:
                errors["full_batch"] = repr(error)
        del model
        torch.cuda.empty_cache()
    del state
    reference_diffusers = None
    if quick or not diffusers_available():
        errors["diffusers_dit_pipeline"] = "skipped: --quick" if quick else "skipped: diffusers is not installed"
    else:
        try:
            reference_diffusers = diffusers_dit_pipeline(uniform_labels(0, range(BATCH), 1000))
        except Exception as error:
            errors["diffusers_dit_pipeline"] = repr(error)
    report = {
        "benchmark": "sampling",
        "model": MODEL,
        "image_size": 256,
        "batch": BATCH,
        "forwards_per_step": 2 * BATCH,
        "steps": STEPS,
        "cfg_scale": CFG_SCALE,
        "sampler": "ddpm",
        "dtype": "each row's precision; fp32 weights but for the fast path's bf16",
        "latent_shape": [BATCH, 4, 32, 32],
        "env": environment(),
        "bf16_matmul_peak_tflops": round(peak_tflops, 1),
        "rows": rows,
        "full_batch": full,
        "diffusers_dit_pipeline": reference_diffusers,
        "errors": errors,
        "targets": TARGETS,
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> dict:
    """The fast path against the targets: step time, full batch, and the ratios to the baselines."""
    step_ms = {row["config"]: row["step_ms"] for row in report["rows"]}
    fast = step_ms.get("fast")
    result = {}
    if fast is not None:
        result["step_ms"] = {"value": fast, "target": TARGETS["step_ms"], "met": fast <= TARGETS["step_ms"]}
        for key, baseline in (("speedup_vs_compiled", "bf16+compile"), ("speedup_vs_fp32", "fp32+tf32")):
            if baseline in step_ms:
                ratio = round(step_ms[baseline] / fast, 2)
                result[key] = {"value": ratio, "target": TARGETS[key], "met": ratio >= TARGETS[key]}
    full = report["full_batch"]
    if full is not None:
        met = full["total_s"] <= TARGETS["full_batch_s"] and full["decode_s"] is not None
        result["full_batch_s"] = {"value": full["total_s"], "target": TARGETS["full_batch_s"], "met": met,
                                  "decode_measured": full["decode_s"] is not None}  # fmt: skip
    return result


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"DiT-XL/2 256px sampling, batch {BATCH} ({2 * BATCH} forwards per CFG step), DDPM {STEPS} steps, "
        f"{env.get('gpu', '?')}, torch {env['torch']}, triton {env['triton']}; bf16 matmul peak "
        f"{report['bf16_matmul_peak_tflops']} TFLOP/s",
        "",
        "| config | ms / step | x fp32 | x compiled | img/s (250 steps) | TFLOP/s | MFU | setup s | peak GiB "
        "| SM MHz | W |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    step_ms = {row["config"]: row["step_ms"] for row in report["rows"]}
    for row in report["rows"]:
        ratios = [
            f"{step_ms[base] / row['step_ms']:.2f}" if base in step_ms else "-"
            for base in ("fp32+tf32", "bf16+compile")
        ]
        gpu = row.get("gpu_during") or {}
        lines.append(
            f"| {row['config']} | {row['step_ms']} | {ratios[0]} | {ratios[1]} | {row['img_per_s_250_steps']} | "
            f"{row['tflops']} | {row['mfu']:.1%} | {row['setup_s']} | {row['peak_mem_gib']} | "
            f"{gpu.get('sm_clock_mhz_median', '-')} | {gpu.get('power_w_median', '-')} |"
        )
    full = report["full_batch"]
    if full is not None:
        decode = f"{full['decode_s']} s" if full["decode_s"] is not None else "not measured (no diffusers)"
        lines += ["", f"full batch on the fast path: {full['total_s']} s for {BATCH} images ({full['sampling_s']} s "
                      f"sampling, decode {decode}, {full['noise_and_host_s']} s noise and host)"]  # fmt: skip
        gpu = full.get("gpu_during")
        if gpu is not None:
            lines.append(
                f"during it: {full['sustained_step_ms']} ms per step, "
                f"SM clock median {gpu['sm_clock_mhz_median']:.0f} MHz "
                f"(min {gpu['sm_clock_mhz_min']:.0f}), power {gpu['power_w_median']} W of {gpu['power_limit_w']} W, "
                f"power-capped in {gpu['power_capped_fraction']:.0%} of samples"
            )
    reference = report["diffusers_dit_pipeline"]
    if reference is not None:
        lines.append(f"diffusers DiTPipeline (bf16, random weights): {reference['total_s']} s for the same batch "
                     f"(~{reference['step_ms']} ms per step, decode {reference['decode_s']} s)")  # fmt: skip
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for key, item in report["verdict"].items():
        lines.append(f"| {key} | {item['value']} | {item['target']} | {'yes' if item['met'] else 'NO'} |")
    for name, error in report["errors"].items():
        lines.append(f"\nnot measured, {name}: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, "sampling", __doc__, "10 timed steps; no fast+compile+graph, no diffusers", run, markdown)

if __name__ == "__main__":
    main()
