"""Where static INT8 pays: one graph quantized on several sets of op types, side by side.

    python -m emu_edge.calibration.placement BUNDLE --calibration CALIB --graph unet [--threads 2]

Every candidate is quantized from the same calibration ranges and measured against the
FP32 graph on the held-out samples (relative error of the output) and in alternating
timing rounds (median ms per call). The result decides STATIC_INT8_OPS in
calibration.quantize; rerun it when the model or onnxruntime changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from emu_edge.calibration import sensitivity
from emu_edge.calibration.calibrate import Calibration
from emu_edge.calibration.quantize import QuantizeSettings, quantize_graph
from emu_edge.runtime.bundle import Bundle

CANDIDATES = {
    "unet": {"Conv": ("Conv",), "Conv+MatMul": ("Conv", "MatMul"), "Conv+MatMul+Gemm": ("Conv", "MatMul", "Gemm"),
             "MatMul": ("MatMul",),
             "all": ("Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Resize", "Sigmoid", "Softmax", "Transpose",
                     "Reshape")},
    "vision_encoder": {"MatMul": ("MatMul",), "MatMul+Conv": ("MatMul", "Conv"), "Conv": ("Conv",),
                       "MatMul+Gemm+Conv": ("MatMul", "Gemm", "Conv"),
                       "all": ("MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax", "Transpose", "Reshape", "Concat")},
}


def compare_placements(bundle_path, calibration, graph: str, candidates: dict | None = None, threads=None,
                       repeats: int = 5, method: str = "minmax", log=print) -> dict:
    bundle = Bundle.open(bundle_path)
    calibration = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    candidates = candidates or CANDIDATES[graph]
    source = bundle.graph_path(graph)
    heldout = calibration.samples(graph, heldout=True) or calibration.samples(graph)
    timing = heldout[:: max(1, len(heldout) // 8)]
    models = {"fp32": onnx.load(str(source))}
    excluded = {}
    for label, ops in candidates.items():
        with tempfile.TemporaryDirectory() as work:
            settings = QuantizeSettings(graphs={graph: "int8"}, calibration=calibration, method=method,
                                        op_types={graph: ops}, auto_exclude=False, threads=threads)
            models[label], result = quantize_graph(graph, source, "int8", settings, calibration, Path(work),
                                                   log=lambda *a: None)
            excluded[label] = result.excluded
        log(f"  quantized on {label}")
    sessions = {label: sensitivity.session(m, threads) for label, m in models.items()}
    out: dict = {}
    for label, sess in sessions.items():
        err = sensitivity.worst(sensitivity.graph_error(sessions["fp32"], sess, heldout))
        q = sum(n.op_type == "QuantizeLinear" for n in models[label].graph.node)
        out[label] = {"ops": list(candidates.get(label, ())), "rel_error": round(err.rel_error, 5),
                      "cosine": round(err.cosine, 6), "quantize_nodes": q, "kept_float": excluded.get(label, []),
                      "ms": []}
    names = {label: sensitivity.compared_outputs(sess) for label, sess in sessions.items()}
    for label, sess in sessions.items():
        sess.run(names[label], timing[0])
    for _ in range(repeats):
        for label, sess in sessions.items():
            start = time.perf_counter()
            for feeds in timing:
                sess.run(names[label], feeds)
            out[label]["ms"].append((time.perf_counter() - start) * 1e3 / len(timing))
    for label in out:
        out[label]["ms"] = round(float(np.median(out[label]["ms"])), 3)
        out[label]["speedup"] = round(out["fp32"]["ms"] / out[label]["ms"], 3)
    return out


def format_placements(graph: str, results: dict) -> str:
    lines = [f"{graph}: static INT8 placements vs FP32 (held-out samples)",
             f"{'quantized ops':<20}{'rel_error':>10}{'cosine':>10}{'Q nodes':>9}{'ms/call':>10}{'speedup':>9}"]
    for label, r in results.items():
        lines.append(f"{label:<20}{r['rel_error']:>10.4f}{r['cosine']:>10.5f}{r['quantize_nodes']:>9}"
                     f"{r['ms']:>10.3f}{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu_edge.calibration.placement", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--graph", choices=sorted(CANDIDATES), default="unet")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = compare_placements(args.bundle, args.calibration, args.graph, threads=args.threads,
                                 repeats=args.repeats, method=args.method)
    print(format_placements(args.graph, results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
