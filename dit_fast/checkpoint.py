"""Reading the official single-file DiT format (released checkpoints, exports, original training checkpoints)."""
import argparse
import os
import zipfile

import torch

from dit_fast.config import DIT_CONFIGS, VAE_DOWNSAMPLE
from dit_fast.model import DiT, create_model


def read_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The model weights in `path`: a bare state_dict, or the EMA weights of a {"model","ema","opt","args"} file.

    mmap=True maps a .pt file's tensors instead of reading them (a legacy non-zip file is read whole).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a local .pt file")
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds no state_dict (expected a dict of tensors or a dict with 'ema')")
    return obj


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict saved with safetensors (`python -m dit_fast.export --safetensors`)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise safetensors_missing(path) from None
    return load_file(str(path), device="cpu")


def safetensors_missing(path: str | os.PathLike) -> ImportError:
    return ImportError(f"reading {str(path)!r} needs the safetensors package: pip install safetensors")


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A short guess of the architecture that produced `state`, for error messages."""
    if "x_embedder.proj.weight" not in state or "pos_embed" not in state:
        return "not a DiT state_dict"
    width, _, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    tokens = state["pos_embed"].shape[1]
    image = int(round(tokens**0.5)) * patch * VAE_DOWNSAMPLE
    names = [c.name for c in DIT_CONFIGS.values() if (c.depth, c.hidden_size, c.patch_size) == (depth, width, patch)]
    return f"{names[0] if names else 'an unknown DiT'} (depth {depth}, width {width}, patch {patch}) at {image}px"


def _patch_size(state: dict[str, torch.Tensor]) -> int | None:
    weight = state.get("x_embedder.proj.weight")
    return weight.shape[-1] if weight is not None and weight.ndim == 4 and "pos_embed" in state else None


def image_size_of(state: dict[str, torch.Tensor], patch_size: int) -> int:
    """Image side implied by the checkpoint's position table."""
    tokens = state["pos_embed"].shape[1]
    return int(round(tokens**0.5)) * patch_size * VAE_DOWNSAMPLE


LABEL_TABLE_KEY = "y_embedder.embedding_table.weight"


def _classes_of_table(shape: tuple[int, ...] | None, class_dropout_prob: float) -> int | None:
    """Classes of a label embedding table of this shape: its rows, less the null class row that guidance adds
    with dropout; None when it is no 2-D table."""
    if shape is None or len(shape) != 2:
        return None
    return shape[0] - int(class_dropout_prob > 0)


def checkpoint_num_classes(path: str | os.PathLike, name: str) -> int | None:
    """The class count of the checkpoint's label table, read without loading the weights (memory-mapped
    .pt, safetensors header); None when the file holds no 2-D label table (load_model then names the problem)."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise safetensors_missing(path) from None
        with safe_open(str(path), "pt") as file:
            shape = file.get_slice(LABEL_TABLE_KEY).get_shape() if LABEL_TABLE_KEY in file.keys() else None
    else:
        table = read_state_dict(path, mmap=True).get(LABEL_TABLE_KEY)
        shape = None if table is None else tuple(table.shape)
    return _classes_of_table(shape, DIT_CONFIGS[name].class_dropout_prob)


def with_num_classes(name: str, state: dict[str, torch.Tensor], model_kwargs: dict, path: str | os.PathLike) -> dict:
    """model_kwargs with the class count of the checkpoint's label embedding table (its rows less the null class
    row of guidance); a num_classes given in model_kwargs must match it."""
    table = state.get(LABEL_TABLE_KEY)
    dropout = model_kwargs.get("class_dropout_prob", DIT_CONFIGS[name].class_dropout_prob)
    implied = _classes_of_table(None if table is None else tuple(table.shape), dropout)
    if implied is None:
        return model_kwargs  # not a DiT label table: load_checked names what is wrong
    given = model_kwargs.get("num_classes", implied)
    if given != implied:
        raise ValueError(
            f"num_classes {given} does not match the checkpoint {str(path)!r}, whose label embedding table "
            f"({table.shape[0]} rows) implies {implied} classes for {name}"
        )
    return dict(model_kwargs, num_classes=implied)


def load_checked(model: DiT, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load; a mismatch lists the missing and unexpected keys and the shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit {model.cfg.name} ({model.cfg.block}) at {model.cfg.input_size * 8}px:"]
        lines.append(f"  the file looks like {describe_state_dict(state)}")
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_model(
    name: str, path: str | os.PathLike, image_size: int | None = None, block: str = "adaLN-Zero", **model_kwargs
) -> DiT:
    """Build `name` and strictly load `path` (official file, export, or training checkpoint's EMA).

    image_size None takes it from the checkpoint's pos_embed and a num_classes left out from its label embedding
    table (rows - 1, the null class); given values must match them.
    """
    state = read_state_dict(path)
    if name in DIT_CONFIGS and _patch_size(state) == DIT_CONFIGS[name].patch_size:
        implied = image_size_of(state, DIT_CONFIGS[name].patch_size)
        if image_size is not None and image_size != implied:
            raise ValueError(
                f"image size {image_size} does not match the checkpoint {str(path)!r}, whose pos_embed "
                f"({state['pos_embed'].shape[1]} tokens) implies {implied}px for {name}"
            )
        image_size = implied
        model_kwargs = with_num_classes(name, state, model_kwargs, path)
    model = create_model(name, image_size=image_size, block=block, **model_kwargs)
    load_checked(model, state, source=f"checkpoint {str(path)!r}")
    return model
