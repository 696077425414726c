"""Sample class-conditional images from a DiT: a grid and one PNG per label, or an FID sample set.

    python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ \\
        --class-labels 207 360 "lesser panda" --cfg-scale 4.0 --out samples/
    torchrun --nproc_per_node=8 sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ \\
        --fid-samples 50000 --cfg-scale 1.5 --out fid_samples/

Checkpoints: the official files, exports and single-file training checkpoints (their EMA weights). A
sharded dit_fast training checkpoint (a directory) must be exported to a single file first. Bad input is
reported before any model or GPU work, as `sample.py: error: ...` with exit status 2.

FID mode writes DIR/000000.png ... and DIR/samples_<N>x<H>x<W>x3.npz (`arr_0`, uint8), the format of
ADM's evaluation suite. Image i's label and noise depend only on (--seed, i), so an interrupted run
resumes where it stopped (present images are kept) and gives the same images as an uninterrupted one,
with any number of processes.
"""

import argparse
import json
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from dit_fast.attention import AUTO, BACKEND_NAMES
from dit_fast.checkpoint import checkpoint_num_classes
from dit_fast.classes import class_display_name, resolve_class_labels
from dit_fast.config import BLOCK_TYPES, DIT_CONFIGS, image_size_to_input_size
from dit_fast.data import latent_to_rgb
from dit_fast.diffusion.fast_sampling import MAX_STEPS, PRECISIONS, SAMPLERS, check_sampling_options, sampler_diffusion
from dit_fast.images import save_grid
from dit_fast.pipeline import (
    Pipeline,
    build_model,
    default_precision,
    index_generators,
    resolve_fused,
    uniform_labels,
)
from dit_fast.vae import DEFAULT_VAE, VAE, check_vae_source

SHOWCASE_LABELS = ["207", "360", "387", "974", "88", "979", "417", "279"]  # the DiT paper's sample.py default
CFG_CHANNEL_CHOICES = {"3": 3, "all": "all"}
VAE_OPTION = "--vae DIR"
NO_VAE_HINT = "pass --no-vae to save latents instead"
RESUME_SETTINGS = ("model", "ckpt", "image_size", "block", "num_classes", "sampler", "steps", "cfg_scale",
                   "cfg_channels", "seed", "vae", "precision")  # fmt: skip
FID_CONFIG_NAME = "fid_samples.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="DiT-XL/2", choices=list(DIT_CONFIGS))
    model.add_argument("--ckpt", help="checkpoint file: official, an export, or a single-file training checkpoint")
    model.add_argument("--random-weights", action="store_true", help="no checkpoint: random init (benchmarks, tests)")
    model.add_argument(
        "--image-size", type=int, help="image side in pixels (default: the checkpoint's, from pos_embed)"
    )
    model.add_argument("--block", default="adaLN-Zero", choices=BLOCK_TYPES)
    model.add_argument(
        "--num-classes", type=int, help="classes of the checkpoint (default: its label table's, else the model config's)"
    )
    model.add_argument("--attn", default=AUTO, choices=(AUTO, *BACKEND_NAMES), help="attention backend")
    model.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fast path: Triton kernels, bf16 weights (default: on for bf16 on CUDA)",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--class-labels",
        nargs="+",
        metavar="LABEL",
        help="class ids or ImageNet names, e.g. 207 'golden retriever' (default: DiT's 8 showcase classes)",
    )
    sampling.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale, >= 1")
    sampling.add_argument(
        "--cfg-channels",
        default="3",
        choices=list(CFG_CHANNEL_CHOICES),
        help="guide the first 3 eps channels (official, the published FID) or all",
    )
    sampling.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    sampling.add_argument("--steps", type=int, default=250, help=f"sampling steps in [1, {MAX_STEPS}]")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on the CPU")
    sampling.add_argument("--per-proc-batch-size", type=int, default=64, help="images per batch and process")
    sampling.add_argument("--device", help="default: cuda (this process's local rank) when available, else cpu")
    sampling.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the whole sampler step as a CUDA graph (default: on CUDA)",
    )
    sampling.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    sampling.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    output = parser.add_argument_group("output")
    output.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: a local directory or a hub id")
    output.add_argument("--no-vae", action="store_true", help="save latents (.npy) and RGB previews, no decoding")
    output.add_argument("--out", default="samples", help="output directory")
    output.add_argument("--fid-samples", type=int, help="write an FID sample set of this many images (labels uniform)")
    return parser


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) under plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(requested: str | None, local_rank: int) -> torch.device:
    if requested is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested!r}: CUDA is not available here; use --device cpu")
    return device


def check_checkpoint_args(args: argparse.Namespace) -> None:
    """--ckpt names one readable file (sharded training checkpoints must be exported), or --random-weights."""
    if args.ckpt is None and not args.random_weights:
        raise ValueError(
            "no checkpoint: pass --ckpt PATH (an official DiT checkpoint, an export or a single-file training "
            "checkpoint), or --random-weights to sample from a randomly initialised model"
        )
    if args.ckpt is not None and args.random_weights:
        raise ValueError("--ckpt and --random-weights exclude each other; pass one")
    if args.ckpt is None:
        return
    if os.path.isdir(args.ckpt):
        raise ValueError(
            f"--ckpt {args.ckpt!r} is a directory (a sharded training checkpoint?); sample.py reads single files: "
            f"export it first with `python -m dit_fast.export --ckpt {args.ckpt} --out model.pt` and pass model.pt"
        )
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt!r} does not exist; pass the path of a checkpoint file")


def validate_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model: returns the resolved settings, or raises naming the bad value."""
    check_checkpoint_args(args)
    config = DIT_CONFIGS[args.model]
    if args.image_size is not None:
        image_size_to_input_size(args.image_size, config.patch_size)
    num_classes = args.num_classes
    if num_classes is None:  # the checkpoint's label table (read without loading the weights), else the config's
        num_classes = (checkpoint_num_classes(args.ckpt, args.model) if args.ckpt else None) or config.num_classes
    if num_classes < 1:
        raise ValueError(f"--num-classes {num_classes} must be >= 1")
    rank, world_size, local_rank = distributed_env()
    if args.fid_samples is not None:
        if args.class_labels is not None:
            raise ValueError("--class-labels cannot be combined with --fid-samples: FID labels are drawn uniformly")
        if args.fid_samples < 1:
            raise ValueError(f"--fid-samples {args.fid_samples} must be >= 1")
        labels = None
    else:
        if world_size > 1:
            raise ValueError("interactive sampling runs in one process; use torchrun only with --fid-samples")
        default = SHOWCASE_LABELS if num_classes == 1000 else [str(i) for i in range(min(8, num_classes))]
        labels = resolve_class_labels(args.class_labels or default, num_classes)
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")
    if args.per_proc_batch_size < 1:
        raise ValueError(f"--per-proc-batch-size {args.per_proc_batch_size} must be >= 1")
    device = resolve_device(args.device, local_rank)
    precision = args.precision or default_precision(device)
    cfg_channels = CFG_CHANNEL_CHOICES[args.cfg_channels]
    check_sampling_options(args.sampler, args.steps, args.cfg_scale, cfg_channels, precision)
    sampler_diffusion(args.sampler, args.steps)  # DDIM step counts with no integer stride fail here
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, not {device}")
    if not args.no_vae:
        check_vae_source(args.vae, VAE_OPTION, NO_VAE_HINT)
    return {
        "labels": labels,
        "num_classes": num_classes,
        "device": device,
        "precision": precision,
        "cfg_channels": cfg_channels,
        "fused": resolve_fused(args.fused, device, precision),
        "rank": rank,
        "world_size": world_size,
    }


def load_pipeline(args: argparse.Namespace, settings: dict) -> Pipeline:
    """The VAE (unless --no-vae) and the DiT; checkpoint and VAE errors surface here, before sampling."""
    device = settings["device"]
    vae = None if args.no_vae else VAE.from_pretrained(args.vae, device, option=VAE_OPTION, alternative=NO_VAE_HINT)
    model = build_model(
        args.model, args.ckpt, args.image_size, args.block, settings["num_classes"], args.attn, settings["fused"]
    )
    return Pipeline(model, vae, device, settings["precision"], args.cuda_graph, args.compile)


def sample_images(
    pipe: Pipeline, args: argparse.Namespace, settings: dict, labels: list[int], indices: list[int], progress: bool
) -> tuple[np.ndarray, torch.Tensor | None]:
    """(N, H, W, 3) uint8 images: VAE-decoded, or with --no-vae RGB previews of the (N, C, h, w) latents also returned.

    Sample i's noise comes from its own generator seeded by (--seed, indices[i]).
    """
    options = dict(
        guidance_scale=args.cfg_scale,
        num_inference_steps=args.steps,
        generator=index_generators(args.seed, indices, settings["device"]),
        sampler=args.sampler,
        cfg_channels=settings["cfg_channels"],
        batch_size=args.per_proc_batch_size,
        progress=progress,
    )
    if pipe.vae is not None:
        return pipe(labels, output_type="np", **options), None
    latents = pipe(labels, output_type="latent", **options)  # (N, C, h, w)
    return latent_to_rgb(latents), latents


def write_interactive(
    args: argparse.Namespace, pixels: np.ndarray, latents: torch.Tensor | None, labels: list[int], num_classes: int
) -> list[str]:
    """The grid, one PNG per label (and with --no-vae the latents as .npy); returns the paths written."""
    os.makedirs(args.out, exist_ok=True)
    written = [save_grid(pixels, os.path.join(args.out, "samples.png"))]
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        path = os.path.join(args.out, f"{index:03d}_{label}.png")
        Image.fromarray(image).save(path)
        written.append(path)
    if latents is not None:
        for name, array in (("latents.npy", latents.float().cpu().numpy()), ("labels.npy", np.array(labels))):
            np.save(os.path.join(args.out, name), array)
            written.append(os.path.join(args.out, name))
    names = ", ".join(f"{label} {class_display_name(label, num_classes)!r}" for label in labels[:8])
    print(f"classes: {names}{' ...' if len(labels) > 8 else ''}")
    return written


def run_interactive(args: argparse.Namespace, settings: dict) -> None:
    pipe = load_pipeline(args, settings)
    labels = settings["labels"]
    pixels, latents = sample_images(pipe, args, settings, labels, list(range(len(labels))), args.progress)
    written = write_interactive(args, pixels, latents, labels, settings["num_classes"])
    timings = pipe.timings
    step_ms = 1000 * timings["sampling_s"] / args.steps
    decoded = "latent previews, no VAE" if args.no_vae else f"VAE decode {timings['decode_s']:.2f} s"
    print(
        f"{len(labels)} images, {args.sampler} {args.steps} steps: sampling {timings['sampling_s']:.2f} s "
        f"({step_ms:.1f} ms per step), {decoded}"
    )
    print(f"wrote {written[0]} and {len(written) - 1} more files in {args.out}")


# ---- FID sample sets ---------------------------------------------------------------------------------


def fid_settings(args: argparse.Namespace, settings: dict) -> dict:
    """The settings that decide the images; a resumed run must match them."""
    return {
        "model": args.model,
        "ckpt": os.path.abspath(args.ckpt) if args.ckpt else None,
        "image_size": args.image_size,
        "block": args.block,
        "num_classes": settings["num_classes"],
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "cfg_channels": args.cfg_channels,
        "seed": args.seed,
        "vae": None if args.no_vae else args.vae,
        "precision": settings["precision"],
    }


def check_resume(out: str, wanted: dict) -> None:
    """Refuse to mix images made with other settings into `out` (every rank reads the same file)."""
    path = os.path.join(out, FID_CONFIG_NAME)
    if not os.path.exists(path):
        return
    with open(path) as file:
        found = json.load(file)
    differences = [
        f"{key}: {found.get(key)!r} there, {wanted[key]!r} now"
        for key in RESUME_SETTINGS
        if found.get(key) != wanted[key]
    ]
    if differences:
        raise ValueError(
            f"{out!r} holds FID samples made with other settings ({'; '.join(differences)}); "
            "resume with the same settings or pass another --out"
        )


def record_settings(out: str, settings: dict) -> None:
    """Write the settings beside the samples, atomically, so later runs can check them."""
    path = os.path.join(out, FID_CONFIG_NAME)
    with open(f"{path}.partial", "w") as file:
        json.dump(settings, file, indent=2)
    os.replace(f"{path}.partial", path)


def sample_name(index: int, total: int) -> str:
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def present_indices(out: str, total: int) -> set[int]:
    """Indices whose PNG is there (files are renamed into place only once completely written)."""
    names = set(os.listdir(out)) if os.path.isdir(out) else set()
    return {index for index in range(total) if sample_name(index, total) in names}


def save_png_atomically(image: np.ndarray, path: str) -> None:
    partial = f"{path}.partial"
    Image.fromarray(image).save(partial, format="PNG")
    os.replace(partial, path)


def write_npz(out: str, total: int) -> str:
    """All samples as one .npz (`arr_0`: (N, H, W, 3) uint8), streamed image by image into the archive."""
    first = np.asarray(Image.open(os.path.join(out, sample_name(0, total))).convert("RGB"))
    shape = (total, *first.shape)
    path = os.path.join(out, f"samples_{'x'.join(map(str, shape))}.npz")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with (
        zipfile.ZipFile(f"{path}.partial", "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
        archive.open("arr_0.npy", "w", force_zip64=True) as stream,
    ):
        np.lib.format.write_array_header_1_0(stream, header)
        for index in range(total):
            image = np.asarray(Image.open(os.path.join(out, sample_name(index, total))).convert("RGB"))
            if image.shape != first.shape:
                raise ValueError(f"{sample_name(index, total)} is {image.shape}, unlike the first sample {first.shape}")
            stream.write(np.ascontiguousarray(image).tobytes())
    os.replace(f"{path}.partial", path)
    return path


def run_fid(args: argparse.Namespace, settings: dict) -> None:
    rank, world_size, device = settings["rank"], settings["world_size"], settings["device"]
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        wanted = fid_settings(args, settings)
        check_resume(args.out, wanted)
        total = args.fid_samples
        present = present_indices(args.out, total)
        os.makedirs(args.out, exist_ok=True)
        if world_size > 1:
            dist.barrier()  # every rank has seen the same files before any rank writes
        if rank == 0:
            record_settings(args.out, wanted)
        missing = sorted(set(range(total)) - present)
        mine = missing[rank::world_size]
        if rank == 0:
            print(
                f"{len(present)} of {total} samples present in {args.out}; {len(missing)} to make "
                f"on {world_size} process(es)"
            )
        pipe = load_pipeline(args, settings) if mine else None
        batches = [
            mine[start : start + args.per_proc_batch_size] for start in range(0, len(mine), args.per_proc_batch_size)
        ]
        began = time.perf_counter()
        for batch in tqdm(batches, desc="FID batches", disable=rank != 0 or not args.progress):
            labels = uniform_labels(args.seed, batch, settings["num_classes"])
            pixels, _ = sample_images(pipe, args, settings, labels, batch, progress=False)
            for index, image in zip(batch, pixels, strict=True):
                save_png_atomically(image, os.path.join(args.out, sample_name(index, total)))
        if mine:
            print(f"rank {rank}: {len(mine)} samples in {time.perf_counter() - began:.1f} s")
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            print(f"wrote {write_npz(args.out, total)}")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = validate_args(args)
        if args.fid_samples is None:
            run_interactive(args, settings)
        else:
            run_fid(args, settings)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
