"""``python -m crystaltune.bench graphs|train ...``: measured speed, printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import cli_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crystaltune.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("graphs", help="graph building: ours vs pymatgen get_all_neighbors (structures/s)")
    g.add_argument("--dataset", default="perovskites")
    g.add_argument("--data")
    g.add_argument("--limit", type=int, default=200, help="crystals to time (0 = all)")
    g.add_argument("--cutoff", type=float, default=8.0)
    g.add_argument("--max-neighbors", type=int, default=12)
    g.add_argument("--json", action="store_true")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "graphs":
        from .graphs import bench_graphs

        out = bench_graphs(args.dataset, args.limit, args.cutoff, args.max_neighbors, args.data)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k:<45} {v:.4g}" if isinstance(v, float) else f"{k:<45} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
