"""Soak: many mixed generations on ONE Pipeline shared by threads; memory and correctness.

    python -m benchmarks.soak [--bundle DIR] [--calls 1000] [--threads 4] [--json soak.json]

Captions, VQA, streamed answers, two-turn conversations and generated images, drawn at
random from a fixed pool of jobs, run from `--threads` threads on one Pipeline. Every
result is compared with the job's sequential result (computed first, one call at a time);
the process's resident memory is sampled every 100 calls. Prints a markdown table (the
README's) and exits non-zero on any wrong result or an RSS growth over 5% after warm-up.
Not a CI test: it takes a few minutes (the shipped bundle by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from emu_edge import data

SAMPLE_EVERY = 100
RSS_LIMIT = 0.05
WEIGHTS = {"caption": 0.35, "vqa": 0.25, "stream": 0.15, "conversation": 0.15, "image": 0.10}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (the soak reads Linux's)")


def job_pool(size: int) -> list[tuple[str, tuple]]:
    """The distinct jobs the soak draws from: 8 of each kind (images: 4 prompts x 2 seeds)."""
    caps = [Image.fromarray(s.segments[0].value) for s in data.captioning("test", 8, size=size)]
    vqa = [(Image.fromarray(s.segments[0].value), next(g.value for g in s.segments if g.kind == "text"))
           for s in data.vqa("test", 8, size=size)]
    jobs = [("caption", (c,)) for c in caps]
    jobs += [("vqa", q) for q in vqa]
    jobs += [("stream", q) for q in vqa]
    jobs += [("conversation", (c, "what colour is it?", "how many shapes are there?")) for c in caps]
    jobs += [("image", (p, seed)) for p in ("a red circle", "a blue square", "a green triangle", "a yellow diamond")
             for seed in (0, 1)]
    return jobs


def run_job(pipe, kind: str, args: tuple):
    if kind == "caption":
        return pipe.generate_text([args[0]])
    if kind == "vqa":
        return pipe.generate_text(list(args))
    if kind == "stream":
        return "".join(pipe.stream_text(list(args)))
    if kind == "conversation":
        chat = pipe.conversation()
        return (chat.ask([args[0], args[1]]), chat.ask([args[2]]))
    return np.asarray(pipe.generate_image([args[0]], seed=args[1])).tobytes()


def soak(bundle: Path | None, calls: int, threads: int, seed: int = 0) -> dict:
    from emu_edge.runtime.pipeline import Pipeline
    from emu_edge.runtime.shipped import default_bundle

    bundle = bundle or default_bundle(log=lambda *a: print(*a, file=sys.stderr))
    pipe = Pipeline.load(bundle, threads=1, max_sessions=threads)
    jobs = job_pool(pipe.manifest.model.emu2.image_size)
    start = time.perf_counter()
    reference = [run_job(pipe, kind, args) for kind, args in jobs]
    reference_s = time.perf_counter() - start
    kinds = [k for k, _ in jobs]
    weights = np.array([WEIGHTS[k] / kinds.count(k) for k in kinds])
    order = np.random.default_rng(seed).choice(len(jobs), size=calls, p=weights / weights.sum())

    lock = threading.Lock()
    done = [0]
    samples: list[tuple[int, int]] = [(0, rss_bytes())]
    wrong: list[tuple[int, str]] = []
    latency: dict[str, list[float]] = {k: [] for k in WEIGHTS}

    def one(call: int, index: int) -> None:
        kind, args = jobs[index]
        t0 = time.perf_counter()
        result = run_job(pipe, kind, args)
        elapsed = time.perf_counter() - t0
        with lock:
            latency[kind].append(elapsed)
            if result != reference[index]:
                wrong.append((call, kind))
            done[0] += 1
            if done[0] % SAMPLE_EVERY == 0:
                samples.append((done[0], rss_bytes()))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one, call, int(i)) for call, i in enumerate(order)]:
            future.result()  # a raised error ends the soak with its traceback
    wall = time.perf_counter() - start
    # Growth is measured from the first sample after warm-up (caches and pools filled).
    after_warmup = [r for n, r in samples if n >= SAMPLE_EVERY]
    growth = (max(after_warmup) - after_warmup[0]) / after_warmup[0] if after_warmup else 0.0
    return {"bundle": str(bundle), "calls": calls, "threads": threads, "distinct_jobs": len(jobs),
            "mix": dict(Counter(kinds[i] for i in order)), "wall_s": wall, "reference_s": reference_s,
            "wrong": len(wrong), "wrong_calls": wrong[:20], "rss_mb": [(n, r / 1e6) for n, r in samples],
            "rss_growth_after_warmup": growth,
            "latency_ms": {k: {"n": len(v), "median": 1e3 * float(np.median(v)), "p99": 1e3 * float(np.quantile(v, 0.99))}
                           for k, v in latency.items() if v}}


def markdown(r: dict) -> str:
    lines = [f"{r['calls']} calls from {r['threads']} threads on one Pipeline ({r['distinct_jobs']} distinct jobs, "
             f"{r['wall_s']:.0f} s): {r['wrong']} wrong results against the sequential ones; resident memory "
             f"{' -> '.join(f'{mb:.0f}' for _, mb in r['rss_mb'])} MB every {SAMPLE_EVERY} calls, "
             f"{100 * r['rss_growth_after_warmup']:+.1f}% after the first {SAMPLE_EVERY}.", "",
             "| job | calls | median ms | p99 ms |", "|---|---:|---:|---:|"]
    for kind, s in r["latency_ms"].items():
        lines.append(f"| {kind} | {s['n']} | {s['median']:.1f} | {s['p99']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the shipped model)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = soak(args.bundle, args.calls, args.threads, args.seed)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0 if result["wrong"] == 0 and result["rss_growth_after_warmup"] <= RSS_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
