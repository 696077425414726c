"""Train a DiT: `torchrun --nproc_per_node=N train.py --model DiT-XL/2 ...` (one GPU or the CPU: `python train.py`).

FSDP2 over all ranks (bf16 compute, fp32 master weights and gradient reduction), per-block
torch.compile, fused AdamW, an fp32 EMA sharded like the parameters, sharded checkpoints that resume
exactly, and rank-0 logging of the all-reduced loss, grad norm, img/s, TFLOP/s and MFU.

Data: the embedded synthetic dataset (default), an ImageNet-layout folder encoded online by the VAE
(--data-path), or latent shards made by `python -m dit_fast.extract` (--latents).

Every random draw of a step (timesteps, noise, label dropout, flips, posterior samples) is made for the
whole global batch from a generator seeded by (global seed, step), and each rank takes its slice; the
data order is a per-epoch shuffle of global batches. So 1 and N GPUs at the same global batch see the
same samples and noise, and a resumed run continues as the uninterrupted one would.

No host sync per step: the all-reduced loss and gradient norm (one all-reduce, which also yields the
logged values) are checked for finiteness on the device. From the first non-finite step on, every update
is skipped there (dit_fast.train_step), so the weights, optimizer state and EMA stay those of the last
good step; the host reads that record every --log-every steps and before each checkpoint or sample grid,
and then stops every rank with the step named, so the last checkpoint stays good. Logged values are
accumulated on the device and read at the same times. bench/train_step.py measures what the per-step
host read it replaced cost.
"""

import argparse
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, default_convert
from tqdm.auto import tqdm

from dit_fast.attention import AUTO, BACKEND_NAMES
from dit_fast.config import BLOCK_TYPES, DIT_CONFIGS, IMAGE_SIZES, VAE_DOWNSAMPLE, get_config
from dit_fast.data import MAX_CLASSES, check_image_size
from dit_fast.diffusion import create_diffusion
from dit_fast.ema import DEFAULT_DECAY, ShardedEMA
from dit_fast.flops import train_flops_per_image
from dit_fast.images import make_grid
from dit_fast.latent_data import read_meta
from dit_fast.parallel import FSDP_UNITS, DistEnv, build_fsdp_model, distributed, fsdp_units
from dit_fast.train_data import (
    DataPosition,
    GlobalBatchSampler,
    check_dataset_classes,
    draw_step_randomness,
    epoch_batches,
    make_data_source,
    next_position,
)
from dit_fast.train_errors import TrainingError, UsageError
from dit_fast.train_hooks import TrainHooks, TrainObjects
from dit_fast.train_logging import (
    GRID_CLASSES,
    MetricWindow,
    close_logging,
    log_metrics,
    logger,
    sample_grid,
    setup_logging,
)
from dit_fast.train_state import (
    checkpoint_name,
    is_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from dit_fast.train_step import OPTIMIZERS, TrainStep, make_optimizer

IMAGENET_TRAIN_IMAGES = 1_281_167
ASSUMED_PEAK_TFLOPS = 777.0  # H200 bf16 dense matmul, measured (8192^3); an assumption on other GPUs
RESUMED_RUN_KEYS = (
    "model", "image_size", "block", "num_classes", "global_batch_size", "data", "dataset_size", "global_seed"
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=list(DIT_CONFIGS), default="DiT-XL/2", help="default: %(default)s")
    model.add_argument(
        "--image-size", type=int, default=None,
        help=f"{' or '.join(map(str, IMAGE_SIZES))} for the paper's models (default 256); DiT-debug takes any "
        "multiple of 16 from 32 (default 64)",
    )  # fmt: skip
    model.add_argument(
        "--num-classes", type=int, default=None,
        help="classes of the label embedding, which holds one more row for the guidance null class (default: "
        "1000, ImageNet's; DiT-debug 10); the synthetic dataset draws labels 0..N-1 of its 1000",
    )  # fmt: skip
    model.add_argument(
        "--block", choices=BLOCK_TYPES, default="adaLN-Zero", help="conditioning variant (default: %(default)s)"
    )
    model.add_argument(
        "--attn", choices=(AUTO, *BACKEND_NAMES), default=AUTO, help="attention backend (default: %(default)s)"
    )
    model.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=None,
        help="the Triton fast path (default: on with CUDA, off on the CPU)",
    )  # fmt: skip
    model.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile(fullgraph=True) each block (default: on with CUDA, off on the CPU)",
    )  # fmt: skip
    model.add_argument(
        "--grad-ckpt", action="store_true", help="activation checkpointing of every block (saves memory)"
    )
    model.add_argument(
        "--fsdp-units", choices=FSDP_UNITS, default="auto",
        help="FSDP2 units: one per block, or the whole model as one (auto: the whole model on one GPU without "
        "--grad-ckpt, which lets the fast path hoist the adaLN projections; per block otherwise)",
    )  # fmt: skip

    data = parser.add_argument_group("data (default: the embedded synthetic dataset)")
    data.add_argument(
        "--data-path", help="ImageNet-layout image folder <root>/<class>/<image>, encoded online by the VAE"
    )
    data.add_argument("--latents", help="latent directory made by `python -m dit_fast.extract`")
    data.add_argument(
        "--vae", default=None,
        help="diffusers AutoencoderKL, a hub id or a local directory: encodes --data-path (default "
        "stabilityai/sd-vae-ft-ema) and decodes the sample grids (without one, grids preview latent channels 0-2)",
    )  # fmt: skip
    data.add_argument(
        "--synthetic-size",
        type=int,
        default=IMAGENET_TRAIN_IMAGES,
        help="items per synthetic epoch (default: %(default)s)",
    )
    data.add_argument(
        "--num-workers", type=int, default=8, help="data loading processes per rank (default: %(default)s)"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--global-batch-size",
        type=int,
        default=256,
        help="summed over ranks, divisible by the world size (default: %(default)s)",
    )
    optim.add_argument("--epochs", type=int, default=1400, help="default: %(default)s")
    optim.add_argument("--max-steps", type=int, default=None, help="stop at this step (counted over the whole run)")
    optim.add_argument(
        "--lr", type=float, default=1e-4, help="constant learning rate, no weight decay (default: %(default)s)"
    )
    optim.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="torch AdamW (fused on CUDA) or apex FusedAdam (default: %(default)s)",
    )
    optim.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)"
    )
    optim.add_argument("--ema-decay", type=float, default=DEFAULT_DECAY, help="default: %(default)s")
    optim.add_argument("--global-seed", type=int, default=0, help="default: %(default)s")
    optim.add_argument(
        "--deterministic", action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning), for comparisons",
    )  # fmt: skip

    run = parser.add_argument_group(
        "results and resuming",
        "A run lives in RESULTS_DIR/RUN_NAME/ (log.txt, metrics.jsonl, checkpoints/, samples/). If that directory "
        "already has a complete checkpoint, the run resumes from the latest one, so rerunning the same command "
        "continues it; --resume PATH starts from a given checkpoint; --no-resume refuses a directory that has one.",
    )  # fmt: skip
    run.add_argument("--results-dir", default="results", help="default: %(default)s")
    run.add_argument("--run-name", default=None, help="default: <model>-<image size>px, e.g. DiT-XL-2-256px")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="PATH", default=None, help="a checkpoint directory to start from")
    resume.add_argument(
        "--no-resume", action="store_true", help="start from scratch; an error if the run has checkpoints"
    )
    run.add_argument(
        "--ckpt-every",
        type=int,
        default=50_000,
        help="steps between checkpoints, plus one at the end (default: %(default)s)",
    )
    run.add_argument(
        "--keep-last", type=int, default=3, help="complete checkpoints kept, 0 keeps all (default: %(default)s)"
    )
    run.add_argument(
        "--log-every", type=int, default=100,
        help="log, and read the on-device finite check, every N steps (default: %(default)s)",
    )  # fmt: skip
    run.add_argument(
        "--sample-every", type=int, default=10_000,
        help="EMA sample grid every N steps and at the end, 0 for never (default: %(default)s)",
    )  # fmt: skip
    run.add_argument(
        "--cfg-scale", type=float, default=4.0, help="guidance scale of the sample grids (default: %(default)s)"
    )
    run.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    run.add_argument(
        "--peak-tflops", type=float, default=ASSUMED_PEAK_TFLOPS,
        help="per-GPU bf16 peak that MFU is relative to; assumed, the default is an H200's measured 8192^3 matmul",
    )  # fmt: skip
    return parser


def fill_model_defaults(args: argparse.Namespace) -> None:
    """--image-size and --num-classes left out take the model config's (256px and 1000 for the paper's models)."""
    config = DIT_CONFIGS[args.model]
    if args.image_size is None:
        args.image_size = config.input_size * VAE_DOWNSAMPLE
    if args.num_classes is None:
        args.num_classes = config.num_classes


def check_image_size_for(model: str, image_size: int) -> None:
    """256/512 for the paper's models; DiT-debug takes any size its patches and the synthetic data allow."""
    if model != "DiT-debug" and image_size not in IMAGE_SIZES:
        raise UsageError(
            f"image size {image_size} is not valid for {model}; choose one of {', '.join(map(str, IMAGE_SIZES))}"
        )
    try:
        get_config(model, image_size=image_size)
        check_image_size(image_size)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_optional_package(flag: str, module: str, install: str) -> None:
    try:
        __import__(module)
    except ImportError as error:
        raise UsageError(f"{flag} needs {module}, which cannot be imported here ({error}); {install}") from None


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Every check that can fail before any work starts, with the bad value and what to do instead."""
    check_image_size_for(args.model, args.image_size)
    if args.global_batch_size < 1 or args.global_batch_size % world_size:
        example = world_size * max(1, args.global_batch_size // world_size)
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} must be a positive multiple of the world size "
            f"{world_size} (each rank takes an equal share); e.g. {example}"
        )
    positive = {"--epochs": args.epochs, "--ckpt-every": args.ckpt_every, "--log-every": args.log_every,
                "--lr": args.lr, "--synthetic-size": args.synthetic_size,
                "--num-classes": args.num_classes}  # fmt: skip
    if args.max_steps is not None:
        positive["--max-steps"] = args.max_steps
    if args.max_grad_norm is not None:
        positive["--max-grad-norm"] = args.max_grad_norm
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    non_negative = {
        "--keep-last": args.keep_last,
        "--sample-every": args.sample_every,
        "--num-workers": args.num_workers,
    }
    for flag, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if args.data_path and args.latents:
        raise UsageError("pass either --data-path (images, encoded online) or --latents (pre-extracted), not both")
    if not (args.data_path or args.latents) and args.num_classes > MAX_CLASSES:
        raise UsageError(
            f"--num-classes {args.num_classes} is more than the synthetic dataset's {MAX_CLASSES} classes; pass at "
            f"most {MAX_CLASSES}, or train on --data-path / --latents"
        )
    if args.data_path and not Path(args.data_path).is_dir():
        raise UsageError(
            f"--data-path {args.data_path!r} is not a directory; pass an ImageNet-layout folder <root>/<class>/<image>"
        )
    if args.latents:
        check_latents(args)
    if args.resume and not is_checkpoint(args.resume):
        raise UsageError(
            f"--resume {args.resume!r} is not a complete checkpoint directory (with trainer.json and .metadata)"
        )
    if args.optimizer == "apex":
        check_optional_package("--optimizer apex", "apex.optimizers", "install NVIDIA apex, or use --optimizer adamw")
    if args.tensorboard:
        check_optional_package(
            "--tensorboard", "torch.utils.tensorboard", "pip install tensorboard, or drop --tensorboard"
        )


def check_latents(args: argparse.Namespace) -> None:
    try:
        meta = read_meta(args.latents)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--latents: {error}") from None
    if meta["image_size"] != args.image_size:
        raise UsageError(
            f"--latents {args.latents!r} holds {meta['image_size']}px latents, but --image-size is {args.image_size}"
        )
    check_dataset_classes("--latents", args.latents, len(meta["classes"]), args.num_classes)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainSummary:
    """How a run ended."""

    run_dir: Path
    step: int
    last_checkpoint: Path | None
    stop_reason: str | None = None
    last_metrics: dict = field(default_factory=dict)


def resolve_run_dir(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to start from (None: from scratch), by the rule in --help."""
    run_name = args.run_name or f"{args.model.replace('/', '-')}-{args.image_size}px"
    run_dir = Path(args.results_dir) / run_name
    latest = latest_checkpoint(run_dir / "checkpoints")
    if args.resume:
        return run_dir, Path(args.resume)
    if args.no_resume and latest is not None:
        raise UsageError(
            f"--no-resume, but {run_dir} already has checkpoints (latest {latest.name}); pass another --run-name "
            f"or --results-dir, or delete {run_dir / 'checkpoints'}"
        )
    return run_dir, latest


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    """The checkpoint's run settings (RESUMED_RUN_KEYS) must be this run's."""
    differing = [
        f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in RESUMED_RUN_KEYS if saved.get(key) != current[key]
    ]
    if differing:
        raise UsageError(
            f"checkpoint {str(path)!r} belongs to a different run ({'; '.join(differing)}); resume with the same "
            "settings, or start a new run with --run-name NEW (or --no-resume in a fresh --results-dir)"
        )


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def oom_message(args: argparse.Namespace, env: DistEnv) -> str:
    per_gpu = args.global_batch_size // env.world_size
    hint = "" if args.grad_ckpt else "--grad-ckpt (activation checkpointing), or "
    return (
        f"CUDA out of memory on rank {env.rank} with {per_gpu} images per GPU ({args.model}, {args.image_size}px): use "
        f"{hint}a smaller per-GPU batch (--global-batch-size {args.global_batch_size // 2}, or more GPUs)"
    )


def train(args: argparse.Namespace, hooks: TrainHooks | None = None) -> TrainSummary:
    """Run (or resume) training as the arguments say; every rank calls it."""
    hooks = hooks or TrainHooks()
    fill_model_defaults(args)
    if args.deterministic:
        set_deterministic()
    with distributed() as env:
        check_args(args, env.world_size)
        run_dir, resume_from = resolve_run_dir(args)
        if env.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        setup_logging(run_dir, env)
        try:
            return run_training(args, hooks, env, run_dir, resume_from)
        except torch.OutOfMemoryError as error:
            raise TrainingError(oom_message(args, env)) from error
        finally:
            close_logging()


def run_training(
    args: argparse.Namespace, hooks: TrainHooks, env: DistEnv, run_dir: Path, resume_from: Path | None
) -> TrainSummary:
    seed_everything(args.global_seed * env.world_size + env.rank)
    on_cuda = env.device.type == "cuda"
    fused = on_cuda if args.fused is None else args.fused
    compile_blocks = on_cuda if args.compile is None else args.compile
    cfg = get_config(args.model, image_size=args.image_size, block=args.block, num_classes=args.num_classes)
    source = make_data_source(args, env, hooks)
    identity = {"model": args.model, "image_size": args.image_size, "block": args.block,
                "num_classes": args.num_classes, "data": source.kind, "dataset_size": len(source.dataset),
                "global_batch_size": args.global_batch_size, "global_seed": args.global_seed}  # fmt: skip
    if resume_from is not None:
        check_resumable(read_trainer_state(resume_from), identity, resume_from)
    model = build_fsdp_model(
        args.model, env, args.global_seed, image_size=args.image_size, block=args.block, num_classes=args.num_classes,
        attn=args.attn, fused=fused, grad_ckpt=args.grad_ckpt, compile_blocks=compile_blocks,
        units=args.fsdp_units,
    )  # fmt: skip
    optimizer = make_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad], args.lr)
    ema = ShardedEMA(model, args.ema_decay)
    diffusion = create_diffusion("")  # 1000 linear-schedule steps, learned sigma: DiT's training process
    step_fn = TrainStep(model, diffusion, optimizer, ema, args.max_grad_norm)
    step, position = 0, DataPosition()
    if resume_from is not None:
        saved = load_checkpoint(resume_from, model, optimizer, ema, env)
        step, position = saved["step"], DataPosition(saved["epoch"], saved["batch_in_epoch"])

    sampler = GlobalBatchSampler(len(source.dataset), args.global_batch_size, env, args.global_seed)
    loader = DataLoader(
        source.dataset, batch_sampler=sampler, num_workers=args.num_workers, collate_fn=default_convert,
        pin_memory=on_cuda, persistent_workers=args.num_workers > 0,
    )  # fmt: skip
    total_steps = args.epochs * sampler.batches_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    flops_per_image = train_flops_per_image(cfg)
    latent_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    logger.info("arguments: %s", json.dumps(vars(args)))
    logger.info(
        "%s at %dpx (%s, %d classes, %.1fM parameters, %.1f GFLOP per training image) on %d x %s; fused %s, "
        "compile %s, grad-ckpt %s, FSDP units %s; data: %s (%d items, %d steps per epoch); global batch %d; %s",
        args.model, args.image_size, args.block, args.num_classes, sum(p.numel() for p in model.parameters()) / 1e6,
        flops_per_image / 1e9, env.world_size, torch.cuda.get_device_name(env.device) if on_cuda else "CPU", fused,
        compile_blocks, args.grad_ckpt, fsdp_units(args.fsdp_units, env.world_size, args.grad_ckpt), source.kind,
        len(source.dataset), sampler.batches_per_epoch,
        args.global_batch_size, f"resumed from {resume_from} at step {step}" if resume_from else "from scratch",
    )  # fmt: skip
    writer = None
    if args.tensorboard and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    def trainer_state() -> dict:
        return dict(identity, epoch=position.epoch, batch_in_epoch=position.batch, world_size=env.world_size,
                    args=dict(vars(args)), saved_at=time.time())  # fmt: skip

    def save(at_step: int) -> Path:
        exit_hook = None
        if hooks.exit_during_checkpoint_at_step == at_step:

            def exit_hook() -> None:  # a kill in the middle of the write
                os._exit(1)

        path = save_checkpoint(
            run_dir / "checkpoints", at_step, model, optimizer, ema, trainer_state(), env, args.keep_last, exit_hook
        )
        logger.info("saved checkpoint %s", path)
        return path

    last_checkpoint = resume_from
    stop_reason = None
    last_metrics: dict = {}
    window = MetricWindow(env.device)
    first_window = True
    progress = tqdm(total=total_steps, initial=step, disable=not env.is_main, unit="step", dynamic_ncols=True)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    batches = epoch_batches(loader, sampler, position)
    try:
        while step < total_steps:
            position, (payload, labels) = next(batches)
            epoch = position.epoch
            payload = payload.to(env.device, non_blocking=True)
            labels = labels.to(env.device, non_blocking=True)
            draws = draw_step_randomness(
                args.global_seed, step, args.global_batch_size, latent_shape, diffusion.num_timesteps,
                step_fn.label_dropout, env,
            )  # fmt: skip
            x = source.to_latents(payload, draws.flip, draws.eps)  # (n, C, h, w)
            if hooks.nan_inputs_at_step == step + 1:
                x = x * float("nan")
            stats = step_fn.gradients(x, labels, draws.t, draws.noise, draws.drop_label)
            step_fn.update(stats, step + 1)  # skipped on the device from a non-finite step on
            step += 1
            position = next_position(position, sampler.batches_per_epoch)
            window.add(stats)
            progress.update(1)
            sample_due = args.sample_every and (step % args.sample_every == 0 or step == total_steps)
            ckpt_due = step % args.ckpt_every == 0 or step == total_steps
            log_due = step % args.log_every == 0 or step == total_steps
            read_due = log_due or ckpt_due or sample_due or not step_fn.skips_on_device
            bad = step_fn.first_non_finite() if read_due else None  # the only host read of the finite check
            if bad is not None:  # the same record on every rank (it comes from all-reduced values)
                stop_reason = (
                    f"non-finite loss or gradient norm at step {bad.step} (loss {bad.loss}, grad norm "
                    f"{bad.grad_norm}); stopped before the optimizer step: no update from it on was applied, and "
                    f"training stopped at step {step}, when it was read. The last good checkpoint is "
                    f"{last_checkpoint or 'none (no checkpoint was written yet)'}"
                )
                logger.error(stop_reason)
                step = bad.step - 1  # the updates applied
                break
            if log_due:
                last_metrics = log_metrics(
                    window, step, epoch, args, env, flops_per_image, first_window, writer, run_dir
                )
                progress.set_postfix(loss=f"{last_metrics['loss']:.4f}")
                first_window = False
            if ckpt_due:
                last_checkpoint = save(step)
            if sample_due:
                grid_path = run_dir / "samples" / f"{checkpoint_name(step)}.png"
                grid = sample_grid(ema, args, source, env, grid_path)
                if env.is_main:
                    logger.info("wrote EMA sample grid %s", grid_path)
                    if writer is not None:
                        writer.add_image("samples", make_grid(grid, nrow=GRID_CLASSES), step, dataformats="HWC")
            window.restart_clock_if_empty()
            if hooks.exit_after_step == step:
                os._exit(1)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if stop_reason is None:
        logger.info("done: %d steps in %s", step, run_dir)
    if hooks.on_finish is not None:
        hooks.on_finish(TrainObjects(env, model, optimizer, ema, step))
    return TrainSummary(run_dir, step, last_checkpoint, stop_reason, last_metrics)


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = train(args, hooks)
    except UsageError as error:
        parser.error(str(error))
    except TrainingError as error:
        raise SystemExit(f"error: {error}") from error
    if summary.stop_reason:
        raise SystemExit(f"error: {summary.stop_reason}")


if __name__ == "__main__":
    main()
