"""Two installs of emu-edge side by side in the same rounds: did a change make a step slower?

    python -m benchmarks.ab A_PYTHON A_BUNDLE B_PYTHON B_BUNDLE [--rounds 7] [--threads 2]

Each round runs `emu-edge bench BUNDLE` once per side, in alternating order, each in a
fresh process of that side's interpreter (so two checkouts of the project, e.g. the commit
before a refactor in a git worktree with its own venv, never share a process). Prints the
medians of each side over the rounds, the min and max (the spread a rerun lands in), and
B's speed relative to A (> 1: B is faster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# figure -> (path into bench's per-bundle result, True where higher is faster)
FIGURES = {
    "decode ms/token (p50)": (("decode", "p50_ms"), False),
    "decode tokens/s": (("decode", "tokens_per_s"), True),
    "prefill 64 tokens ms": (("prefill", "64", "median_ms"), False),
    "regression ms (all N)": (("regression", "median_ms"), False),
    "U-Net step ms": (("unet_step", "median_ms"), False),
    "caption ms": (("caption", "median_ms"), False),
}


def bench_once(python: str, bundle: str, threads: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [python, "-m", "emu_edge.cli", "bench", bundle, "--json", str(out), "--threads", str(threads)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True, capture_output=True)
        return json.loads(out.read_text())["bundles"][0]


def _get(result: dict, path: tuple):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("a_python")
    parser.add_argument("a_bundle")
    parser.add_argument("b_python")
    parser.add_argument("b_bundle")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sides = {"A": (args.a_python, args.a_bundle), "B": (args.b_python, args.b_bundle)}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for side in ("AB" if r % 2 == 0 else "BA"):
            runs[side].append(bench_once(*sides[side], args.threads, args.quick))
            print(f"round {r + 1}/{args.rounds}: {side} done", file=sys.stderr)
    lines = [f"{args.rounds} rounds, alternating; A = {args.a_bundle}, B = {args.b_bundle}", "",
             "| figure | A median [min-max] | B median [min-max] | B is |", "|---|---:|---:|---:|"]
    table = {}
    for name, (path, higher_faster) in FIGURES.items():
        values = {s: [v for v in (_get(x, path) for x in runs[s]) if v is not None] for s in runs}
        if not values["A"] or not values["B"]:
            continue
        med = {s: float(np.median(v)) for s, v in values.items()}
        speed = med["B"] / med["A"] if higher_faster else med["A"] / med["B"]
        table[name] = {"A": values["A"], "B": values["B"], "b_speed": speed}
        cell = {s: f"{med[s]:.3f} [{min(values[s]):.3f}-{max(values[s]):.3f}]" for s in values}
        lines.append(f"| {name} | {cell['A']} | {cell['B']} | {speed:.3f}x |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
