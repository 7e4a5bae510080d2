"""Side-by-side speed of an FP32 bundle and its quantized variants, in one process.

    python -m emu_edge.calibration.bench FP32 INT8 INT4 [--calibration CALIB] [--threads 2]

For each bundle: greedy decode tokens/s (a 16-token prompt, 128 new tokens, through the
runtime's KV-cached loop) and the per-call latency of every graph that differs from the
FP32 one, on held-out calibration samples when given, else on random inputs at the
manifest's opt shapes (batch 2 for the U-Net: cond and uncond). Bundles are measured in
alternating rounds so that all of them see the same machine state; the best round counts
for throughput and the median for latency. No figure here is asserted anywhere: speed is
reported, not tested.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from emu_edge.calibration import sensitivity
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.pipeline import Pipeline


def random_feeds(bundle: Bundle, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the manifest's opt shapes (random values, integers in a valid range)."""
    spec = bundle.manifest.graphs[name]
    model = bundle.manifest.model
    rng = np.random.default_rng(seed)
    feeds = {}
    for io in spec.inputs:
        shape = spec.profiles.get(io.name, {}).get("opt") or [d if isinstance(d, int) else 1 for d in io.shape]
        if io.name == "timestep":
            feeds[io.name] = np.full(shape, 500.0, np.float32)
        elif np.dtype(io.dtype).kind in "iu":
            feeds[io.name] = rng.integers(0, max(2, min(model.vocab_size, 100)), shape).astype(io.dtype)
        else:
            feeds[io.name] = rng.standard_normal(shape).astype(io.dtype)
    return feeds


def prompt_ids(pipe: Pipeline, length: int) -> list[int]:
    """A seeded prompt of ordinary tokens (no image or special tokens)."""
    special = pipe.manifest.model.special_ids()
    ids = [t for t in range(pipe.manifest.model.vocab_size) if t not in special]
    rng = np.random.default_rng(0)
    return rng.choice(ids, size=length).tolist()


def decode_tokens_per_s(pipe: Pipeline, prompt: list[int], tokens: int) -> float:
    session = pipe.session(1)
    out = session.prefill([prompt])
    token = out.logits.argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        token = session.step(token).logits.argmax(-1)
    return (tokens - 1) / (time.perf_counter() - start)


def compare(bundles: dict[str, str | Path], calibration=None, threads: int | None = None, tokens: int = 128,
            prompt_length: int = 16, repeats: int = 5, graphs: list[str] | None = None) -> dict:
    """{label: {"decode_tokens_per_s", "graphs_ms": {graph: ms}, "size_mb"}}; the first
    bundle is the reference whose graphs the others are compared with."""
    if isinstance(calibration, (str, Path)):
        from emu_edge.calibration.calibrate import Calibration

        calibration = Calibration.load(calibration)
    opened = {label: Bundle.open(path) for label, path in bundles.items()}
    reference = next(iter(opened.values()))
    pipes = {label: Pipeline.load(b, threads=threads) for label, b in opened.items()}
    prompt = prompt_ids(next(iter(pipes.values())), prompt_length)
    # The decoder is measured by tokens/s through the runtime's loop: a plain call would
    # copy the whole KV cache in and out, which the bound in-place loop never does.
    names = graphs or [n for n in reference.manifest.graphs if n not in ("judge", "decoder")
                       and any(b.has_graph(n) and b.manifest.graphs[n].sha256 != reference.manifest.graphs[n].sha256
                               for b in opened.values())]
    results = {label: {"precisions": {n: g.precision for n, g in b.manifest.graphs.items()},
                       "size_mb": round(sum((b.path / g.file).stat().st_size for g in b.manifest.graphs.values()
                                            if g.file != "judge.onnx") / 1e6, 2),
                       "graphs_ms": {}, "decode_tokens_per_s": 0.0} for label, b in opened.items()}
    sessions, feeds = {}, {}
    for name in names:
        if calibration is not None and name in calibration.graphs:
            samples = calibration.samples(name, heldout=True) or calibration.samples(name)
            samples = samples[:: max(1, len(samples) // 8)]
        else:
            samples = [random_feeds(reference, name, seed) for seed in range(4)]
        for label, b in opened.items():
            sess = sensitivity.session(str(b.graph_path(name)), threads)
            sessions[label, name] = sess
            feeds[label, name] = [sensitivity._cast_feeds(sess, f) for f in samples]
            sess.run(sensitivity.compared_outputs(sess), feeds[label, name][0])   # warm-up
    times: dict = {key: [] for key in sessions}
    for label, pipe in pipes.items():   # warm-up
        decode_tokens_per_s(pipe, prompt, 8)
    for _ in range(repeats):
        for label, pipe in pipes.items():
            rate = decode_tokens_per_s(pipe, prompt, tokens)
            results[label]["decode_tokens_per_s"] = max(results[label]["decode_tokens_per_s"], round(rate, 1))
            for name in names:
                sess, fs = sessions[label, name], feeds[label, name]
                outputs = sensitivity.compared_outputs(sess)
                start = time.perf_counter()
                for f in fs:
                    sess.run(outputs, f)
                times[label, name].append((time.perf_counter() - start) * 1e3 / len(fs))
    for (label, name), ts in times.items():
        results[label]["graphs_ms"][name] = round(float(np.median(ts)), 3)
    return results


def format_results(results: dict) -> str:
    labels = list(results)
    ref = results[labels[0]]
    graphs = list(ref["graphs_ms"])
    head = f"{'':<28}" + "".join(f"{label:>14}" for label in labels)
    lines = [head]
    lines.append(f"{'size MB (without judge)':<28}" + "".join(f"{results[lb]['size_mb']:>14.2f}" for lb in labels))
    lines.append(f"{'decode tokens/s':<28}" + "".join(f"{results[lb]['decode_tokens_per_s']:>14.1f}" for lb in labels))
    lines.append(f"{'  x fp32':<28}" + "".join(
        f"{results[lb]['decode_tokens_per_s'] / ref['decode_tokens_per_s']:>13.2f}x" for lb in labels))
    for name in graphs:
        lines.append(f"{name + ' ms/call':<28}" + "".join(f"{results[lb]['graphs_ms'][name]:>14.3f}" for lb in labels))
        lines.append(f"{'  speedup':<28}" + "".join(
            f"{ref['graphs_ms'][name] / results[lb]['graphs_ms'][name]:>13.2f}x" for lb in labels))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu_edge.calibration.bench", description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="the FP32 bundle first, then its variants")
    parser.add_argument("--calibration", type=Path, help="measure graphs on its held-out samples")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    labels = {}
    for path in args.bundles:
        label = path.name
        while label in labels:
            label += "'"
        labels[label] = path
    results = compare(labels, args.calibration, args.threads, args.tokens, repeats=args.repeats)
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
