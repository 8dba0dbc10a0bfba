"""``python -m crystaltune.data info|build NAME|PATH``: inspect a dataset or build its graph cache."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import CrystaltuneError, cli_main
from ..graphs.cache import GraphParams
from .dataset import load_dataset
from .info import dataset_info, format_info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crystaltune.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("info", "crystals, targets, elements, sizes and skipped records"),
        ("build", "build (or load) the cached crystal graphs"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("dataset", help="registry name (perovskites, perov5, sunmat) or a path")
        s.add_argument("--data", help="dataset file for a registry name (e.g. the SNUMAT file)")
        s.add_argument("--targets", nargs="+", help="target names (default: the dataset's)")
        s.add_argument("--cutoff", type=float, default=8.0)
        s.add_argument("--max-neighbors", type=int, default=12)
        s.add_argument("--strict", action="store_true", help="fail if any record is skipped")
        s.add_argument("--no-cache", action="store_true")
        s.add_argument("--max-records", type=int, help="accept files of up to N records (default 1,000,000)")
        s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0.5 <= args.cutoff <= 20:  # also NaN
        raise CrystaltuneError(f"--cutoff must be in [0.5, 20] Å, got {args.cutoff}")
    if args.max_neighbors is not None and not 0 <= args.max_neighbors <= 64:
        raise CrystaltuneError(f"--max-neighbors must be in [1, 64] (0: no cap), got {args.max_neighbors}")
    if args.max_records is not None:
        if args.max_records < 1:
            raise CrystaltuneError(f"--max-records must be >= 1, got {args.max_records}")
        os.environ["CRYSTALTUNE_MAX_RECORDS"] = str(args.max_records)
    ds = load_dataset(
        args.dataset,
        args.targets,
        data=args.data,
        strict=args.strict,
        use_cache=not args.no_cache,
        params=GraphParams(args.cutoff, args.max_neighbors or None),
    )
    info = dataset_info(ds)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
    elif args.cmd == "info":
        print(format_info(info))
    else:
        print(f"{info['name']}: {info['crystals']} crystal graphs ready ({len(info['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
