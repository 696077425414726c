"""Export a training checkpoint's EMA weights as the official single-file DiT state dict (fp32).

    python -m dit_fast.export --ckpt results/DiT-XL-2-256px/checkpoints/0400000 --out DiT-XL-2-256.pt
    python -m dit_fast.export --ckpt results/DiT-XL-2-256px --out DiT-XL-2-256.safetensors --safetensors

--ckpt is a checkpoint directory, or a run directory (its latest complete checkpoint is used). The file
has the official key names, so dit_fast.checkpoint.load_model, sample.py and the original DiT code load
it with strict=True. Runs in one process, with no process group: DCP reads the sharded checkpoint whole.
"""

import argparse
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from dit_fast.model import create_model
from dit_fast.train_state import is_checkpoint, latest_checkpoint, read_trainer_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the latest complete one of a run directory."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a complete checkpoint nor a run directory with one; pass "
            "results/<run>/checkpoints/<step> or results/<run>"
        )
    return latest


def saved_model_kwargs(trainer_state: dict) -> dict:
    """create_model's image_size, block and num_classes for the run that wrote trainer.json."""
    return {key: trainer_state[key] for key in ("image_size", "block", "num_classes")}


def read_ema_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(EMA state dict with official keys, fp32 CPU tensors; trainer.json with saved_model_kwargs filled in) of a
    checkpoint or run directory."""
    checkpoint = resolve_checkpoint(path)
    trainer_state = read_trainer_state(checkpoint)
    model_kwargs = saved_model_kwargs(trainer_state)
    with torch.device("meta"):
        shapes = create_model(trainer_state["model"], **model_kwargs)
    ema = {name: torch.empty(tensor.shape, dtype=torch.float32) for name, tensor in shapes.state_dict().items()}
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"ema": ema}, checkpoint_id=str(checkpoint), no_dist=True)
    return ema, dict(trainer_state, **model_kwargs, checkpoint=str(checkpoint))


def write_state_dict(state: dict[str, torch.Tensor], out: str | Path, use_safetensors: bool = False) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if use_safetensors:
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (latest checkpoint)")
    parser.add_argument("--out", required=True, help="output file (.pt, or .safetensors with --safetensors)")
    parser.add_argument("--safetensors", action="store_true", help="write safetensors instead of torch.save")
    args = parser.parse_args(argv)
    if args.safetensors:
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            parser.error("--safetensors needs the safetensors package: pip install safetensors")
    try:
        state, trainer_state = read_ema_state(args.ckpt)
    except FileNotFoundError as error:
        parser.error(str(error))
    out = write_state_dict(state, args.out, args.safetensors)
    print(
        f"wrote {out}: EMA weights of {trainer_state['model']} at {trainer_state['image_size']}px "
        f"({trainer_state['block']}, {trainer_state['num_classes']} classes), step {trainer_state['step']}, "
        f"from {trainer_state['checkpoint']}"
    )


if __name__ == "__main__":
    main()
