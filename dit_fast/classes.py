"""ImageNet (ILSVRC-2012) class names, so users can ask for "golden retriever" instead of 207.

imagenet_classes.txt holds the 1000 classes in index order, one per line, each line the class's
comma-separated WordNet synonyms ("tench, Tinca tinca"); the first synonym is the display name.
A name resolves case-insensitively to the class that has it as its first synonym, else as any synonym;
a few names belong to two classes ("crane": the bird 134 and the machine 517) and must be given as ids.
"""

import difflib
import functools
from importlib import resources
from numbers import Integral

IMAGENET_NUM_CLASSES = 1000
MAX_SUGGESTIONS = 5


@functools.cache
def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """Every class's synonyms, in index order: (("tench", "Tinca tinca"), ("goldfish", ...), ...)."""
    text = resources.files("dit_fast").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    classes = tuple(tuple(name.strip() for name in line.split(",")) for line in text.splitlines() if line.strip())
    if len(classes) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt lists {len(classes)} classes, expected {IMAGENET_NUM_CLASSES}")
    return classes


def imagenet_class_names() -> list[str]:
    """The display name (first synonym) of every class, in index order."""
    return [synonyms[0] for synonyms in imagenet_synonyms()]


def class_display_name(label: int, num_classes: int = IMAGENET_NUM_CLASSES) -> str:
    """A label's ImageNet name when the model has ImageNet's 1000 classes, else "class <label>"."""
    return imagenet_synonyms()[label][0] if num_classes == IMAGENET_NUM_CLASSES else f"class {label}"


def _normalise(name: str) -> str:
    return " ".join(name.lower().split())


@functools.cache
def _name_index() -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[int]], dict[str, list[int]]]:
    """Lookup tables, most specific first: first synonym (exact case, any case), any synonym (exact, any case)."""
    tables: tuple[dict[str, list[int]], ...] = ({}, {}, {}, {})
    for label, synonyms in enumerate(imagenet_synonyms()):
        for position, name in enumerate(synonyms):
            tiers = (0, 1, 2, 3) if position == 0 else (2, 3)
            for tier in tiers:
                key = name if tier in (0, 2) else _normalise(name)
                labels = tables[tier].setdefault(key, [])
                if label not in labels:
                    labels.append(label)
    return tables


def class_label_from_name(name: str) -> int:
    """The ImageNet id of a class name; unknown or ambiguous names raise a ValueError with suggestions."""
    for tier, table in enumerate(_name_index()):
        labels = table.get(" ".join(name.split()) if tier in (0, 2) else _normalise(name), [])
        if len(labels) == 1:
            return labels[0]
        if len(labels) > 1:
            synonyms = imagenet_synonyms()
            choices = "; ".join(f"{label} ({', '.join(synonyms[label][:3])})" for label in labels)
            raise ValueError(f"class name {name!r} is ambiguous: it names {choices}; pass the class id instead")
    any_synonym = _name_index()[3]
    close = difflib.get_close_matches(_normalise(name), list(any_synonym), n=MAX_SUGGESTIONS, cutoff=0.6)
    hint = ""
    if close:
        hint = "; did you mean " + ", ".join(f"{match!r} ({any_synonym[match][0]})" for match in close) + "?"
    raise ValueError(f"unknown ImageNet class name {name!r}{hint} (or pass a class id in [0, {IMAGENET_NUM_CLASSES}))")


def resolve_class_label(value: int | str, num_classes: int) -> int:
    """A class id from an int, a numeric string ("207") or, for 1000-class models, an ImageNet name."""
    if isinstance(value, bool) or not isinstance(value, (Integral, str)):
        raise ValueError(f"class label {value!r} must be an integer id or an ImageNet class name")
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.lstrip("-").isdigit():
        value = int(text)
    if isinstance(value, Integral):
        if not 0 <= value < num_classes:
            raise ValueError(
                f"class label {int(value)} is out of range: the model has {num_classes} classes, "
                f"ids in [0, {num_classes})"
            )
        return int(value)
    if num_classes != IMAGENET_NUM_CLASSES:
        raise ValueError(
            f"class name {value!r} needs an ImageNet model (1000 classes); this model has {num_classes} classes: "
            f"pass ids in [0, {num_classes})"
        )
    return class_label_from_name(text)


def resolve_class_labels(values: list[int | str], num_classes: int) -> list[int]:
    """Class ids for a list of ids and/or names (see resolve_class_label)."""
    if len(values) == 0:
        raise ValueError("no class labels given: pass at least one class id or name")
    return [resolve_class_label(value, num_classes) for value in values]
