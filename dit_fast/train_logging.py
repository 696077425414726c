"""Training output: the run's log, the metric window and metrics.jsonl/TensorBoard lines, and EMA sample grids."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dit_fast.checkpoint import load_checked
from dit_fast.data import latent_to_rgb
from dit_fast.ema import ShardedEMA
from dit_fast.flops import mfu
from dit_fast.images import save_grid
from dit_fast.model import create_model
from dit_fast.parallel import DistEnv
from dit_fast.train_data import DataSource
from dit_fast.train_step import StepStats

GRID_CLASSES = 8
GRID_SAMPLES_PER_CLASS = 4
GRID_SAMPLING_STEPS = 50
logger = logging.getLogger("dit_fast.train")


class ProgressBarHandler(logging.StreamHandler):
    """Console lines written through tqdm, so they do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=self.stream)


def setup_logging(run_dir: Path, env: DistEnv) -> None:
    """Rank 0 logs to stdout and run_dir/log.txt; other ranks print warnings and errors only."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if env.is_main:
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [ProgressBarHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")]
        logger.setLevel(logging.INFO)
    else:
        formatter = logging.Formatter(f"[rank {env.rank}] %(message)s")
        handlers = [logging.StreamHandler(sys.stderr)]
        logger.setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)


def close_logging() -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class MetricWindow:
    """Sums of the step stats on the device since the last log; read (one sync) every --log-every steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock_if_empty(self) -> None:
        """Keep checkpoint and sampling time out of the next window's img/s (when they fall on a log step)."""
        if self.steps == 0:
            self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.grad_norm += stats.grad_norm
        self.steps += 1

    def read(self) -> dict:
        loss, grad_norm = torch.stack([self.loss, self.grad_norm]).tolist()
        seconds = time.perf_counter() - self.started
        values = {
            "loss": loss / self.steps,
            "grad_norm": grad_norm / self.steps,
            "steps": self.steps,
            "seconds": seconds,
        }
        self.reset()
        return values


@torch.no_grad()
def sample_grid(
    ema: ShardedEMA, args: argparse.Namespace, source: DataSource, env: DistEnv, path: Path
) -> np.ndarray | None:
    """DDIM-50 samples with CFG from the EMA weights, gathered onto rank 0 into a plain model; a PNG there."""
    state = ema.full_state_dict(keep=env.is_main)
    image = None
    if env.is_main:
        from dit_fast.pipeline import Pipeline  # the project's one sampling loop

        model = create_model(
            args.model, image_size=args.image_size, block=args.block, num_classes=args.num_classes, attn="sdpa"
        )
        load_checked(model, state, source="the EMA weights")
        del state
        pipe = Pipeline(model, vae=source.vae, device=env.device, cuda_graph=False)
        num_classes = model.num_classes
        labels = list(range(min(num_classes, GRID_CLASSES))) * GRID_SAMPLES_PER_CLASS
        out = pipe(
            labels, guidance_scale=args.cfg_scale, num_inference_steps=GRID_SAMPLING_STEPS, sampler="ddim",
            generator=torch.Generator(env.device).manual_seed(args.global_seed), progress=False,
            output_type="np" if source.vae is not None else "latent",
        )  # fmt: skip
        image = out if source.vae is not None else latent_to_rgb(out)  # (N, H, W, 3) uint8
        save_grid(image, path, nrow=min(num_classes, GRID_CLASSES))
        del pipe, model
    dist.barrier()
    return image


def log_metrics(
    window: MetricWindow,
    step: int,
    epoch: int,
    args: argparse.Namespace,
    env: DistEnv,
    flops_per_image: int,
    first_window: bool,
    writer,
    run_dir: Path,
) -> dict:
    """Read the window (one sync), log one line on rank 0 and append it to metrics.jsonl."""
    values = window.read()
    images_per_s = values["steps"] * args.global_batch_size / values["seconds"]
    tflops_per_gpu = images_per_s * flops_per_image / env.world_size / 1e12
    metrics = {
        "step": step, "epoch": epoch, "loss": values["loss"], "grad_norm": values["grad_norm"],
        "img_per_s": images_per_s, "tflops_per_gpu": tflops_per_gpu,
        "mfu": mfu(tflops_per_gpu, args.peak_tflops),
        "peak_mem_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None,
    }  # fmt: skip
    if env.is_main:
        memory = f"{metrics['peak_mem_gib']:.1f} GiB" if metrics["peak_mem_gib"] is not None else "n/a (CPU)"
        logger.info(
            "step %d (epoch %d) loss %.4f grad norm %.3f | %.1f img/s, %.1f TFLOP/s per GPU, MFU %.1f%% of an assumed "
            "%.0f TFLOP/s peak | peak memory %s%s",
            step, epoch, metrics["loss"], metrics["grad_norm"], images_per_s, tflops_per_gpu,
            100 * metrics["mfu"], args.peak_tflops, memory, " (includes compile and warm-up)" if first_window else "",
        )  # fmt: skip
        with open(run_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for key in ("loss", "grad_norm", "img_per_s", "tflops_per_gpu", "mfu"):
                writer.add_scalar(f"train/{key}", metrics[key], step)
    return metrics
