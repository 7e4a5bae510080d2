"""The side-by-side suite's smoke pass (`pytest benchmarks --benchmark-only --smoke`): every
peer runs on the smoke presets and the results come out as JSON and PNG. Figures are checked
for presence and consistency only; the published numbers come from full runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_side_by_side_smoke_pass(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--smoke", "-q", "-p", "no:cacheprovider",
         "--bench-out", str(out), "--bench-cache", str(cache)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "EMU_EDGE_BENCH_SMOKE": ""})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    peers = {name: set(c["peers"]) for name, c in results["comparisons"].items()}
    decode = next(v for k, v in peers.items() if k.startswith("decode:"))
    assert {"transformers eager fp32", "onnxruntime-genai fp32", "onnxruntime-genai int4",
            "emu-edge fp32", "emu-edge int8", "emu-edge int4"} <= decode
    regression = next(v for k, v in peers.items() if k.startswith("regression:"))
    assert any("Emu2 reference" in p for p in regression) and any(p.startswith("emu-edge") for p in regression)
    for comparison in results["comparisons"].values():
        for figures in comparison["peers"].values():
            assert figures["min_s"] <= figures["median_s"] <= figures["max_s"]
            assert math.isfinite(figures["median_s"]) and figures["rounds"] >= 2
    assert results["targets"] and all(math.isfinite(t["measured"]) for t in results["targets"])
    for png in ("side_by_side.png", "scaling.png"):
        assert Image.open(out / png).size[0] > 100
