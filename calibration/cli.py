"""Verbs `emu-edge calibrate` and `emu-edge quantize`.

    emu-edge data --split val --n 64 --size 32 --out calib_data
    emu-edge calibrate BUNDLE --data calib_data --out CALIB
    emu-edge quantize BUNDLE --precision int8 --calibration CALIB --out BUNDLE_INT8 --report int8.json
    emu-edge quantize BUNDLE --precision int4 --calibration CALIB --out BUNDLE_INT4 --report int4.json
    emu-edge quantize BUNDLE --graph decoder=int4 --out BUNDLE_Q        (no calibration needed)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emu_edge.cli import thread_count
from emu_edge.runtime.manifest import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("bundle", type=Path, help="the FP32 bundle folder")
    if verb == "calibrate":
        parser.add_argument("--data", required=True, type=Path,
                            help="calibration folder (prompts.jsonl + images/), e.g. from emu-edge data --split val")
        parser.add_argument("--out", required=True, type=Path, help="the calibration folder to write")
        parser.add_argument("--max-new-tokens", type=int, default=16, help="decode steps recorded per text prompt")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps per image prompt "
                                                                    "(default: the bundle's)")
        parser.add_argument("--image-size", type=int, default=None,
                            help="side in pixels of the images an emu3 bundle generates (default: the bundle's "
                                 "image area; a smaller one records the same graphs in far fewer steps)")
        parser.add_argument("--max-samples", type=int, default=256, help="samples kept per graph")
        parser.add_argument("--heldout", type=float, default=0.2,
                            help="fraction of the prompts held out for the accuracy report")
    else:
        from emu_edge.calibration.quantize import METHODS

        parser.add_argument("--out", required=True, type=Path, help="the new bundle folder")
        parser.add_argument("--precision", help=f"every graph that supports it: {' | '.join(PRECISIONS[1:])}")
        parser.add_argument("--graph", help="per-graph precision, e.g. decoder=int4,unet=int8 (overrides --precision)")
        parser.add_argument("--calibration", type=Path, help="from emu-edge calibrate; needed for static INT8 "
                                                             "(vision encoder, U-Net) and for --report")
        parser.add_argument("--method", default="minmax", help=f"activation ranges: {' | '.join(METHODS)}")
        parser.add_argument("--exclude", help="nodes kept in float, graph:node,node;graph:node (the report "
                                              "suggests these)")
        parser.add_argument("--no-auto-exclude", action="store_true",
                            help="do not keep error-adding nodes in float automatically")
        parser.add_argument("--max-rel-error", type=float, default=None,
                            help="graph error on calibration samples above which nodes are kept in float "
                                 "(default: 0.05 int8, 0.15 int4)")
        parser.add_argument("--max-excluded", type=int, default=16,
                            help="at most this many nodes per graph are kept in float automatically")
        parser.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (16, 32, 64, 128)")
        parser.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                            help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = as input")
        parser.add_argument("--asymmetric", action="store_true", help="MatMulNBits weights with zero points")
        parser.add_argument("--tensorrt", action="store_true",
                            help="static INT8 as TensorRT builds it (signed, symmetric, zero points 0)")
        parser.add_argument("--report", type=Path, help="write the accuracy report here (JSON) and beside it "
                                                        "as a table (.txt)")
        parser.add_argument("--report-prompts", type=int, default=None,
                            help="test-split prompts per task in the report (default: 200 captioning, 200 VQA, "
                                 "64 text-to-image, 64 text)")
        parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="CPU threads per graph (capped at the CPU count)")


def run(args) -> int:
    """Errors reach emu_edge.cli, which prints them as one line."""
    return _calibrate(args) if args.verb == "calibrate" else _quantize(args)


def _calibrate(args) -> int:
    from emu_edge.calibration.calibrate import CalibrateSettings, calibrate

    settings = CalibrateSettings(max_new_tokens=args.max_new_tokens, steps=args.steps, image_size=args.image_size,
                                 max_samples=args.max_samples, heldout=args.heldout, threads=args.threads)
    out = calibrate(args.bundle, args.data, args.out, settings)
    print(f"wrote {out}")
    return 0


def _quantize(args) -> int:
    from emu_edge.calibration.quantize import (QuantizeSettings, parse_exclude, parse_graph_precisions,
                                               quantize_bundle)

    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise ValueError(f"--block-size must be a power of two >= 16, got {args.block_size}")
    settings = QuantizeSettings(
        precision=args.precision, graphs=parse_graph_precisions(args.graph), calibration=args.calibration,
        method=args.method, exclude=parse_exclude(args.exclude), auto_exclude=not args.no_auto_exclude,
        max_rel_error=args.max_rel_error, max_excluded=args.max_excluded, block_size=args.block_size, accuracy_level=args.accuracy_level,
        symmetric=not args.asymmetric, tensorrt=args.tensorrt, threads=args.threads)
    if args.report_prompts is not None and args.report_prompts < 1:
        raise ValueError(f"--report-prompts must be >= 1, got {args.report_prompts}")
    if args.report is not None and args.calibration is None:
        raise ValueError("--report measures graphs on held-out calibration samples: pass --calibration CALIB "
                         "(emu-edge calibrate BUNDLE --data DIR --out CALIB)")
    out, results = quantize_bundle(args.bundle, args.out, settings, overwrite=args.overwrite)
    print(f"wrote {out}")
    if args.report is not None:
        from emu_edge.calibration.report import ReportSettings, build_report, format_table, write_report

        report_settings = ReportSettings(threads=args.threads)
        if args.report_prompts is not None:
            n = args.report_prompts
            report_settings = ReportSettings(captions=n, vqa=n, t2i=n, text_prompts=n, threads=args.threads)
        report = build_report(args.bundle, out, args.calibration, report_settings,
                              quantization={n: r.to_dict() for n, r in results.items()})
        json_path, table_path = write_report(report, args.report)
        print(format_table(report))
        print(f"wrote {json_path} and {table_path}")
    return 0
