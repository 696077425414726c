"""PNG plots of a suite report (matplotlib, Agg backend): throughput against GFLOPs, speed-ups, MFU, kernel bandwidth.

Models are coloured by size (S, B, L, XL) and marked by patch size (2, 4, 8), as in the DiT paper's figures.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402

SIZE_COLOURS = {"S": "tab:blue", "B": "tab:orange", "L": "tab:green", "XL": "tab:red"}
PATCH_MARKERS = {2: "o", 4: "s", 8: "^"}
FAST = {"training": "fast", "sampling": "fast"}
REFERENCES = {"training": ("reference-compiled", "reference-eager"), "sampling": ("bf16+compile", "bf16", "fp32+tf32")}
VARIANT_KEY = {"training": "variant", "sampling": "config"}
THROUGHPUT_KEY = {"training": "img_per_s", "sampling": "img_per_s_250_steps"}
THROUGHPUT_LABEL = {"training": "training img/s", "sampling": "sampling img/s (250 DDPM steps, estimated)"}
KERNEL_IMPLS = ("eager", "compiled", "triton")


def size_and_patch(name: str) -> tuple[str, int]:
    """'DiT-XL/2' -> ('XL', 2)."""
    size, patch = name.removeprefix("DiT-").split("/")
    return size, int(patch)


def rows_of(report: dict, part: str) -> list[dict]:
    return (report["parts"].get(part) or {"rows": []})["rows"]


def models_in_order(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["model"] for row in rows))


def model_legend(axes: plt.Axes, reference: str) -> None:
    """Size colours, patch markers, and filled = fast / hollow = reference."""
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=f"DiT-{s}") for s, c in SIZE_COLOURS.items()]
    handles += [
        Line2D([], [], color="grey", marker=m, linestyle="", label=f"patch {p}") for p, m in PATCH_MARKERS.items()
    ]
    handles += [
        Line2D([], [], color="black", marker="o", linestyle="", label="fast"),
        Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="", label=reference),
    ]
    axes.legend(handles=handles, fontsize=7, loc="best")


def throughput_plot(report: dict) -> plt.Figure | None:
    """img/s against forward GFLOPs per image, log-log, fast (filled) and the first measured of the references
    (compiled, else eager; hollow)."""
    panels = [part for part in ("training", "sampling") if rows_of(report, part)]
    if not panels:
        return None
    figure, axes_list = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for axes, part in zip(axes_list[0], panels):
        measured = {row[VARIANT_KEY[part]] for row in rows_of(report, part)}
        reference = next((r for r in REFERENCES[part] if r in measured), REFERENCES[part][0])  # compiled if run
        for row in rows_of(report, part):
            variant = row[VARIANT_KEY[part]]
            if variant not in (FAST[part], reference):
                continue
            size, patch = size_and_patch(row["model"])
            colour = SIZE_COLOURS[size]
            x, y = row["forward_gflops_per_image"], row[THROUGHPUT_KEY[part]]
            face = colour if variant == FAST[part] else "none"
            axes.scatter(x, y, s=60, marker=PATCH_MARKERS[patch], facecolors=face, edgecolors=colour)
            axes.annotate(
                row["model"].removeprefix("DiT-"), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7
            )
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("forward GFLOPs per image (2 x the paper's Gflops)")
        axes.set_ylabel(THROUGHPUT_LABEL[part])
        axes.set_title(f"{part}: fast vs {reference}")
        axes.grid(True, which="both", alpha=0.3)
        model_legend(axes, reference)
    figure.suptitle(f"DiT throughput against model GFLOPs, 256px, {report['env'].get('gpu', '')}")
    return figure


def grouped_bars(axes: plt.Axes, models: list[str], series: dict[str, list[float | None]]) -> None:
    """One group of bars per model, one bar per series; missing values are left out."""
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [m + (index - (len(series) - 1) / 2) * width for m in range(len(models))]
        present = [(p, v) for p, v in zip(positions, values) if v is not None]
        axes.bar([p for p, _ in present], [v for _, v in present], width, label=label)
    axes.set_xticks(range(len(models)), [name.removeprefix("DiT-") for name in models], rotation=40, ha="right")
    axes.legend(fontsize=7)
    axes.grid(True, axis="y", alpha=0.3)


def speedups(report: dict, part: str) -> tuple[list[str], dict[str, list[float | None]]]:
    """Per model, the fast path's throughput over each reference's."""
    rows = rows_of(report, part)
    value = {(row["model"], row[VARIANT_KEY[part]]): row[THROUGHPUT_KEY[part]] for row in rows}
    models = models_in_order(rows)
    series = {}
    for reference in REFERENCES[part]:
        ratios = [
            value[(m, FAST[part])] / value[(m, reference)]
            if (m, FAST[part]) in value and (m, reference) in value
            else None
            for m in models
        ]
        if any(r is not None for r in ratios):
            series[f"{part}: fast / {reference}"] = ratios
    return models, series


def speedup_plot(report: dict) -> plt.Figure | None:
    panels = [part for part in ("training", "sampling") if speedups(report, part)[1]]
    if not panels:
        return None
    figure, axes_list = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axes, part in zip(axes_list[0], panels):
        models, series = speedups(report, part)
        grouped_bars(axes, models, series)
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_ylabel("speed-up of the fast path (x)")
        axes.set_title(f"{part} speed-up per config")
    return figure


def mfu_plot(report: dict) -> plt.Figure | None:
    """MFU (against the measured bf16 matmul peak) per config, one bar per variant."""
    panels = [part for part in ("training", "sampling") if rows_of(report, part)]
    if not panels:
        return None
    figure, axes_list = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axes, part in zip(axes_list[0], panels):
        rows = rows_of(report, part)
        models = models_in_order(rows)
        mfu = {(row["model"], row[VARIANT_KEY[part]]): 100 * row["mfu"] for row in rows}
        variants = list(dict.fromkeys(row[VARIANT_KEY[part]] for row in rows))
        grouped_bars(axes, models, {v: [mfu.get((m, v)) for m in models] for v in variants})
        axes.set_ylabel(f"MFU, % of {report['bf16_matmul_peak_tflops']} TFLOP/s bf16 matmul")
        axes.set_title(f"{part} MFU per config")
    return figure


def kernel_bandwidth_plot(report: dict) -> plt.Figure | None:
    """Each op's achieved bandwidth as a fraction of the device copy bandwidth, per pass and shape."""
    kernels = report["parts"].get("kernels")
    if not kernels:
        return None
    rows = kernels["results"]
    goals = [t["goal"] / 100 for t in report.get("targets", []) if t["part"] == "kernels" and t["unit"] == "%"]
    modes = list(dict.fromkeys(row["pass"] for row in rows))
    cases = list(dict.fromkeys((r["op"], r["B"], r["T"]) for r in rows))
    figure, axes_list = plt.subplots(
        len(modes), 1, figsize=(max(8, 0.8 * len(cases)), 3.2 * len(modes)), squeeze=False, sharex=True
    )
    for axes, mode in zip(axes_list[:, 0], modes):
        fraction = {
            (r["op"], r["B"], r["T"], r["impl"]): r["fraction_of_copy_bandwidth"] for r in rows if r["pass"] == mode
        }
        cases = list(dict.fromkeys((op, B, T) for op, B, T, _ in fraction))
        series = {impl: [fraction.get((*case, impl)) for case in cases] for impl in KERNEL_IMPLS}
        grouped_bars(axes, [f"{op} {B}x{T}" for op, B, T in cases], series)
        if mode == "fwd" and goals:
            axes.axhline(goals[0], color="black", linestyle="--", linewidth=0.8)
        axes.set_title(f"{mode} (dashed: the forward target)" if mode == "fwd" and goals else mode)
        axes.set_ylabel("fraction of copy bandwidth")
    figure.suptitle(f"kernel bandwidth, copy = {kernels['copy_bandwidth_GBps']:.0f} GB/s, {kernels['gpu']}")
    return figure


PLOTS = {
    "throughput": throughput_plot,
    "speedup": speedup_plot,
    "mfu": mfu_plot,
    "kernel-bandwidth": kernel_bandwidth_plot,
}


def write_plots(report: dict, prefix: str) -> tuple[list[str], dict[str, dict]]:
    """<prefix>-<name>.png for every plot whose data the report holds: (paths written, errors by plot)."""
    paths, errors = [], {}
    for name, draw in PLOTS.items():
        try:
            figure = draw(report)
            if figure is None:
                continue
            path = f"{prefix}-{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            paths.append(path)
        except Exception as error:  # one plot failing must not lose the report
            plt.close("all")
            errors[f"plot {name}"] = {"part": "plots", "error": repr(error)}
    return paths, errors
