"""Encode an image folder into latent shards once, so training reads latents instead of running the VAE.

    python -m dit_fast.extract --data-path imagenet/train --out latents256 --vae stabilityai/sd-vae-ft-ema
    torchrun --nproc_per_node=8 -m dit_fast.extract ...        # shard i is encoded by rank i % N

Each shard keeps the VAE posterior mean and std of every image and of its mirror image (see
dit_fast.latent_data for the layout). Resumable: complete shards are skipped; a shard is written under a
temporary name and renamed when complete, so an interrupted run leaves no half shard behind.

The encoder interface (dit_fast.vae.VAE, or any object in tests): encode(images) with images
(N, 3, H, W) float in [-1, 1] on its device returns the posterior (mean, std), each (N, 4, H/8, W/8), in
DiT latent units (times 0.18215).
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, default_convert
from tqdm.auto import tqdm

from dit_fast.config import IMAGE_SIZES, VAE_DOWNSAMPLE
from dit_fast.image_data import ImageFolder, uint8_to_model_range
from dit_fast.latent_data import FORMAT, LABELS_FILE, META_FILE, MOMENTS_FILE, TMP_SUFFIX, shard_name
from dit_fast.parallel import DistEnv, distributed

LATENT_CHANNELS = 4
DEFAULT_SHARD_SIZE = 4096


def load_encoder(source: str, device: torch.device, alternative: str):
    """dit_fast.vae.VAE from a hub id or a local directory (diffusers is optional: imported only here)."""
    from dit_fast.vae import VAE

    return VAE.from_pretrained(source, device=device, option="--vae DIR", alternative=alternative)


@torch.no_grad()
def encode_both_views(encoder, images: torch.Tensor) -> np.ndarray:
    """(n, 3, S, S) uint8 -> (n, 2 [image, mirror], 2 [mean, std], C, S/8, S/8) float16."""
    pixels = uint8_to_model_range(images)  # (n, 3, S, S)
    mean, std = encoder.encode(torch.cat([pixels, pixels.flip(-1)]))  # (2n, C, h, w) each
    n = len(images)
    moments = torch.stack([mean.float(), std.float()], dim=1)  # (2n, 2, C, h, w)
    moments = moments.view(2, n, *moments.shape[1:]).transpose(0, 1)  # (n, 2, 2, C, h, w)
    return moments.half().cpu().numpy()


def dataset_meta(dataset: ImageFolder, image_size: int, shard_size: int, vae: str) -> dict:
    side = image_size // VAE_DOWNSAMPLE
    return {
        "format": FORMAT,
        "image_size": image_size,
        "latent_shape": [LATENT_CHANNELS, side, side],
        "num_images": len(dataset),
        "shard_size": shard_size,
        "num_shards": -(-len(dataset) // shard_size),
        "classes": dataset.classes,
        "vae": vae,
        "scale_factor": 0.18215,
        "dtype": "float16",
        "layout": "moments[i, view (image, mirror), (posterior mean, posterior std), C, h, w]",
    }


def write_or_check_meta(out: Path, meta: dict) -> None:
    """Write meta.json, or check that an existing one describes the same extraction."""
    path = out / META_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        differing = sorted(key for key in meta if existing.get(key) != meta[key])
        if differing:
            raise ValueError(
                f"{str(out)!r} already holds latents of another extraction (different {', '.join(differing)}); "
                f"pass another --out, or the same arguments to resume it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1) + "\n")


def encode_shard(
    dataset: ImageFolder,
    encoder,
    env: DistEnv,
    out: Path,
    index: int,
    meta: dict,
    batch_size: int,
    num_workers: int,
    progress: tqdm,
) -> None:
    """Encode shard `index` into <out>/shard-XXXXX.tmp/, then rename it to shard-XXXXX/."""
    start = index * meta["shard_size"]
    indices = list(range(start, min(start + meta["shard_size"], len(dataset))))
    tmp = out / (shard_name(index) + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    moments = open_memmap(
        tmp / MOMENTS_FILE, mode="w+", dtype=np.float16, shape=(len(indices), 2, 2, *meta["latent_shape"])
    )
    labels = np.empty(len(indices), dtype=np.int64)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=default_convert,
        pin_memory=env.device.type == "cuda",
    )  # fmt: skip
    row = 0
    for images, batch_labels in loader:
        n = len(images)
        moments[row : row + n] = encode_both_views(encoder, images.to(env.device, non_blocking=True))
        labels[row : row + n] = batch_labels.numpy()
        row += n
        progress.update(n)
    moments.flush()
    del moments
    np.save(tmp / LABELS_FILE, labels)
    tmp.rename(out / shard_name(index))


def extract(
    data_path: str,
    out: str,
    image_size: int,
    encoder,
    env: DistEnv,
    vae_name: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    num_workers: int = 4,
) -> dict:
    """Encode every pending shard of this rank (shard i belongs to rank i % world size); returns meta."""
    out_dir = Path(out)
    dataset = ImageFolder(data_path, image_size)
    meta = dataset_meta(dataset, image_size, shard_size, vae_name)
    if env.is_main:
        write_or_check_meta(out_dir, meta)
    dist.barrier()
    mine = [i for i in range(env.rank, meta["num_shards"], env.world_size) if not (out_dir / shard_name(i)).is_dir()]
    pending_images = sum(min(shard_size, len(dataset) - i * shard_size) for i in mine)
    with tqdm(total=pending_images, unit="img", disable=not env.is_main, desc="encoding (rank 0)") as progress:
        for index in mine:
            encode_shard(dataset, encoder, env, out_dir, index, meta, batch_size, num_workers, progress)
    dist.barrier()
    return meta


def build_parser() -> argparse.ArgumentParser:
    from dit_fast.vae import DEFAULT_VAE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageNet-layout folder: <root>/<class>/<image>")
    parser.add_argument("--out", required=True, help="latent directory to create or complete")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: a hub id or a local directory")
    parser.add_argument("--image-size", type=int, choices=IMAGE_SIZES, default=256)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (each is also encoded mirrored)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes per rank")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error(f"--shard-size and --batch-size must be positive, got {args.shard_size}, {args.batch_size}")
    with distributed() as env:
        try:
            encoder = load_encoder(args.vae, env.device, alternative="check the --vae path")
        except (ImportError, FileNotFoundError) as error:  # no diffusers, no weights
            parser.error(f"--vae {args.vae!r}: {error}")
        meta = extract(
            args.data_path, args.out, args.image_size, encoder, env, args.vae, args.shard_size, args.batch_size,
            args.num_workers,
        )  # fmt: skip
        if env.is_main:
            classes, shards = len(meta["classes"]), meta["num_shards"]
            print(f"{args.out}: {meta['num_images']} images of {classes} classes in {shards} shards")


if __name__ == "__main__":
    main()
