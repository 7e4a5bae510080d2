"""Verb `emu-edge build-engines BUNDLE --precision fp16 | int8`: see emu_edge.export.tensorrt.

    --check   only the static TensorRT compatibility check (no TensorRT or GPU needed)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from emu_edge.export.tensorrt import BUILD_PRECISIONS

    parser.add_argument("bundle", type=Path, help="bundle folder (decoder exported with --attention standard)")
    parser.add_argument("--precision", default="fp16", help=f"engine precision: {' | '.join(BUILD_PRECISIONS)}")
    parser.add_argument("--graphs", help="comma-separated graphs (default: all TensorRT graphs of the bundle)")
    parser.add_argument("--cache", type=Path, help="engine cache folder (default: $EMU_EDGE_ENGINE_CACHE or "
                                                   "~/.cache/emu-edge/engines)")
    parser.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit")
    parser.add_argument("--check", action="store_true", help="only check that TensorRT can build the graphs")


def run(args) -> int:
    from emu_edge.export.tensorrt import EngineBuildError, build_engines
    from emu_edge.export.trt_check import check_bundle
    from emu_edge.runtime.backends import BackendError
    from emu_edge.runtime.bundle import BundleError

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    try:
        if args.check:
            problems = check_bundle(args.bundle, graphs)
            for name, found in problems.items():
                print(f"{name}: " + ("ok" if not found else f"{len(found)} problem(s)"))
                for p in found:
                    print(f"  {p.where}: {p.message}")
            return 1 if any(problems.values()) else 0
        workspace = int(args.workspace_gb * 1024**3) if args.workspace_gb else None
        entries = build_engines(args.bundle, args.precision, graphs, args.cache, workspace)
    except (EngineBuildError, BackendError, BundleError, ValueError) as e:
        print(f"emu-edge build-engines: error: {e}", file=sys.stderr)
        return 1
    print(f"built {len(entries)} engine(s)")
    return 0
