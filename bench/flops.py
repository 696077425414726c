"""Parameters and forward GMACs of the paper's DiT configurations, analytic, against the paper's figures.

    python bench/flops.py            # table
    python bench/flops.py --json     # the same rows as a JSON list
    python bench/flops.py --counted  # also count the model's forward with torch's FlopCounterMode (fake tensors)

The paper's "Gflops" are multiply-accumulates (GMACs); GFLOPs here are 2 x GMACs.
"""
import argparse
import json

from dit_fast.config import get_config
from dit_fast.flops import FLOPS_PER_MAC, counted_forward_flops, flop_table


def format_table(rows: list[dict]) -> str:
    counted = "counted_gmacs" in rows[0]
    header = f"{'model':<10} {'block':<16} {'px':>4} {'params':>13} {'GMACs':>9} {'GFLOPs':>9} {'paper':>8} {'diff':>7}"
    header += f" {'counted':>9}" if counted else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (
            f"{row['model']:<10} {row['block']:<16} {row['image_size']:>4} {row['params']:>13,} "
            f"{row['gmacs']:>9.3f} {row['gflops']:>9.3f} {row['paper_gmacs']:>8.2f} {row['diff_pct']:>+6.2f}%"
        )
        lines.append(line + (f" {row['counted_gmacs']:>9.3f}" if counted else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument(
        "--counted", action="store_true", help="add counted_gmacs: torch's FlopCounterMode on the model (~1 s a row)"
    )
    args = parser.parse_args(argv)
    rows = flop_table()
    if args.counted:
        for row in rows:
            cfg = get_config(row["model"], image_size=row["image_size"], block=row["block"])
            row["counted_gmacs"] = counted_forward_flops(cfg) / FLOPS_PER_MAC / 1e9
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
