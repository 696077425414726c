"""Render saved benchmark results (bench/results/*.json) as markdown, each with its benchmark's own tables.

    python -m bench.report bench/results/*.json
"""
import argparse
import importlib
import json

RENDERERS = {  # results' "benchmark" field -> (module, markdown function)
    "kernels": ("bench.kernels", "markdown_table"),
    "kernel_sweep": ("bench.kernel_sweep", "markdown"),
    "attention": ("bench.attention", "markdown_tables"),
    "model": ("bench.model", "markdown"),
    "sampling": ("bench.sampling", "markdown"),
    "train_step": ("bench.train_step", "markdown"),
    "suite": ("bench.suite_report", "markdown"),
}


def render(report: dict) -> str:
    """Markdown for one results dict; an unknown benchmark name is an error listing the known ones."""
    name = report.get("benchmark")
    if name not in RENDERERS:
        raise ValueError(f"unknown benchmark {name!r} in results; known: {', '.join(RENDERERS)}")
    module, function = RENDERERS[name]
    env = report.get("env", report)
    header = (
        f"### {name}\n\n{env.get('gpu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
        f"commit {env.get('commit', env.get('git_commit', '?'))}\n\n"
    )
    return header + getattr(importlib.import_module(module), function)(report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files")
    args = parser.parse_args(argv)
    for path in args.results:
        with open(path) as f:
            print(render(json.load(f)) + "\n")


if __name__ == "__main__":
    main()
