"""`python -m bench` (`make bench`, `make bench-quick`): the benchmark suite of bench/suite.py."""

import argparse
import shlex
import sys

from bench import suite
from bench.configs import PAPER_MODELS, QUICK_MODELS
from bench.environment import RESULTS_DIR


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a GPU count of at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the short subset (see above)")
    parser.add_argument(
        "--out-dir", default=RESULTS_DIR, help="where the JSON, markdown and PNGs go (default: %(default)s)"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=suite.PARTS, default=list(suite.PARTS), help="the parts to run (default: all)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=PAPER_MODELS, default=None,
        help=f"configs for training and sampling (default: all 12; with --quick {' '.join(QUICK_MODELS)})",
    )  # fmt: skip
    parser.add_argument(
        "--gpus", type=positive_int, default=1,
        help="spread the tasks over this many GPUs, one worker process each; scaling then runs alone (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, metavar="SECONDS",
        help="start no task after this many seconds; the ones left are reported as not run",
    )  # fmt: skip
    parser.add_argument("--render", metavar="JSON", help="only redraw the markdown and plots of a saved suite JSON")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="only merge saved runs (slices of one suite on the same GPU model) into one report in --out-dir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.render or args.merge:
        for path in suite.render_saved(args.render) if args.render else suite.merge_saved(args.merge, args.out_dir):
            print("wrote", path)
        return 0
    command = shlex.join(["python", "-m", "bench", *argv])
    return suite.main(args.quick, args.out_dir, args.parts, args.models, command, args.gpus, args.time_budget)


if __name__ == "__main__":
    sys.exit(main())
