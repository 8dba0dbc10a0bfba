"""``python -m crystaltune.bench graphs|train ...``: measured speed, printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CrystaltuneError, cli_main


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
    t = sub.add_parser("train", help="training throughput (graphs/s, excluding the first epoch) and peak memory")
    t.add_argument("--dataset", default="perovskites")
    t.add_argument("--model", default="cgcnn")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--head-hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--amp", action="store_true")
    t.add_argument(
        "--reference-code",
        metavar="DIR",
        help="also run the reference CGCNN code itself (its folder, with main.py) on the same crystals",
    )
    t.add_argument("--limit", type=int, help="a seeded subset of N crystals")
    t.add_argument("--json", action="store_true")
    gp = sub.add_parser("gpu", help="one GPU: batch sizes x AMP per model, packed trials, the reference code")
    gp.add_argument("--quick", action="store_true", help="small sizes (CI; without CUDA it only says so)")
    gp.add_argument("--models", nargs="+", default=["cgcnn"])
    gp.add_argument("--reference-code", metavar="DIR", help="the reference CGCNN code's folder, run on the same GPU")
    gp.add_argument("--output", help="also write the JSON document to this file")
    gp.add_argument("--readme", help="write the GPU section into this README (between its markers)")
    a = sub.add_parser("all", help="the whole suite: graphs, cache, training per model, DDP 1->2, search overhead, GPU")
    a.add_argument("--quick", action="store_true", help="small sizes (CI)")
    a.add_argument(
        "--reference-code",
        metavar="DIR",
        help="the reference CGCNN code's folder: cgcnn's throughput is compared with that code run here",
    )
    a.add_argument(
        "--search", nargs="+", help="search spaces timed for overhead (default: smoke, plus perovskites unless --quick)"
    )
    a.add_argument("--output", help="also write the JSON document to this file")
    a.add_argument("--readme", help="write the Performance section into this README (between its markers)")
    a.add_argument("--json", action="store_true")
    r = sub.add_parser("render", help="write the Performance section of a README from a saved `bench all` JSON file")
    r.add_argument("file", help="JSON written by `bench all --output`")
    r.add_argument("--readme", default="README.md")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("threads", "epochs", "batch_size", "limit"):
        value = getattr(args, name, None)
        if value is not None and value < 1 and not (name == "limit" and value == 0):
            raise CrystaltuneError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.cmd == "graphs":
        from .graphs import bench_graphs

        out = bench_graphs(args.dataset, args.limit, args.cutoff, args.max_neighbors, args.data)
    elif args.cmd == "render":
        return _render(json.loads(Path(args.file).read_text()), args.readme)
    elif args.cmd == "all":
        from .suite import bench_all

        out = bench_all(
            args.quick,
            tuple(args.search) if args.search else None,
            "python -m crystaltune.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            args.reference_code,
        )
        if args.output:
            Path(args.output).write_text(json.dumps(out, indent=1, default=str))
        if args.readme:
            _render(out, args.readme)
    elif args.cmd == "gpu":
        from ..readme import render_gpu, splice
        from .gpu import bench_gpu

        out = bench_gpu(args.quick, tuple(args.models), args.reference_code)
        if args.output:
            Path(args.output).write_text(json.dumps(out, indent=1, default=str))
        if args.readme:
            splice(args.readme, "gpu", render_gpu(out))
    elif args.cmd == "train":
        from .recipe import BenchRecipe
        from .train import bench_train

        names = ("model", "dataset", "epochs", "batch_size", "threads", "hidden", "head_hidden", "layers", "device")
        recipe = BenchRecipe(**{k: getattr(args, k) for k in names}, amp=args.amp, limit=args.limit)
        out = bench_train(recipe, args.reference_code)
    if getattr(args, "json", False) or args.cmd in ("all", "gpu"):
        print(json.dumps(out, indent=1, default=str))
    else:
        for k, v in out.items():
            print(f"{k:<45} {v:.4g}" if isinstance(v, float) else f"{k:<45} {v}")
    return 0


def _render(bench: dict, readme: str) -> int:
    from ..readme import render_performance, splice

    try:
        text = render_performance(bench)
    except KeyError as exc:
        raise CrystaltuneError(f"not a `bench all` result: no key {exc}") from None
    splice(readme, "performance", text)
    print(f"README section performance: {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
