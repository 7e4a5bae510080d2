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

REPO = Path(__file__).resolve().parents[2]


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
    image = next(k for k in peers if k.startswith("emu3 image:"))
    whos = ("transformers eager fp32", "emu-edge fp32", "emu-edge int8", "emu-edge int4")
    assert {f"{who} {guidance}" for who in whos for guidance in ("CFG 3", "no CFG")} == peers[image]
    figures = results["comparisons"][image]
    assert all(0 < share < 1 for share in figures["vq_decode_share"].values())
    assert all(rate > 0 for rate in figures["tokens_per_s"].values()) and len(figures["cfg_cost"]) == 4
    assert len(figures["peak_rss_mb"]) == 4   # each peer with guidance
    assert all(0 < m["after_load"] <= m["peak"] for m in figures["peak_rss_mb"].values())
    tokens = next(v for k, v in peers.items() if k.startswith("emu3 image tokens"))
    assert {"onnxruntime-genai fp32", "onnxruntime-genai int4", "emu-edge fp32 image tokens, no CFG",
            "emu-edge int4 image tokens, no CFG"} <= tokens
    for comparison in results["comparisons"].values():
        for figures in comparison["peers"].values():
            assert figures["min_s"] <= figures["median_s"] <= figures["max_s"]
            assert math.isfinite(figures["median_s"]) and figures["rounds"] >= 2
    assert results["targets"] and all(math.isfinite(t["measured"]) for t in results["targets"])
    for png in ("side_by_side.png", "scaling.png"):
        assert Image.open(out / png).size[0] > 100

    # Our text loop and onnxruntime-genai's on the smoke decoder, each beside its graph alone.
    built = next((cache / "artifacts").glob("decoder-smoke-*"))
    versus = tmp_path / "versus.json"
    text = _run(["-m", "benchmarks.profile", str(built / "bundle-fp32"), "--genai", str(built / "genai-fp32"),
                 "--steps", "4", "--threads", "1", "--json", str(versus)]).stdout
    us = json.loads(versus.read_text())["us_per_token"]
    for who in ("emu-edge", "onnxruntime-genai"):
        assert all(us[f"{who} {part}"] > 0 for part in ("loop", "prefill", "graph alone"))
        assert us[f"{who} step"] == (us[f"{who} loop"] * 4 - us[f"{who} prefill"]) / 3
    assert "a later token" in text


def _run(args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_profile_breaks_a_step_down_and_measures_the_floors(tiny_bundle, tmp_path):
    """`python -m benchmarks.profile`: per-operator shares of a decode step and of a U-Net
    call, the decoder's weight-reading nodes alone, the loop's own Python."""
    decoder, unet = tmp_path / "decoder.json", tmp_path / "unet.json"
    out = _run(["-m", "benchmarks.profile", str(tiny_bundle), "--steps", "4", "--threads", "1",
                "--json", str(decoder)]).stdout
    assert "weight-reading nodes alone" in out and "us a token" in out
    d = json.loads(decoder.read_text())
    assert {"GroupQueryAttention", "MatMul"} <= set(d["per_operator"])
    assert all(o["us"] > 0 and o["nodes"] >= 1 for o in d["per_operator"].values())
    assert d["step_ms"]["min"] <= d["step_ms"]["median"]
    assert 0 < d["loop_python_us"] < d["step_ms"]["median"] * 1e3
    assert d["weight_ops_alone"]["nodes"] >= 1 and d["weight_ops_alone"]["gb_per_s"] > 0

    guided = tmp_path / "guidance.json"
    _run(["-m", "benchmarks.profile", str(tiny_bundle), "--guidance", "--threads", "1", "--json", str(guided)])
    g = json.loads(guided.read_text())
    assert g["cost"] == g["step_ms"]["batch 2"] / g["step_ms"]["batch 1"] > 0

    _run(["-m", "benchmarks.profile", str(tiny_bundle), "--graph", "unet", "--threads", "1", "--json", str(unet)])
    u = json.loads(unet.read_text())
    assert u["per_operator"]["Conv"]["gflop"] > 0 and u["sgemm_gflop_per_s"] > 0

    # The isolated graph holds every weight-reading node of the decoder, with its weights,
    # and computes what the node computes (x @ W for the MatMuls), on fresh random inputs.
    check = f"""
import numpy as np, onnx
from onnx import numpy_helper
from benchmarks import peers, profile
path = {str(tiny_bundle / "decoder.onnx")!r}
model, feeds, nbytes = profile.weight_ops_alone(path)
source = onnx.load(path)
assert len(model.graph.node) == sum(n.op_type in profile.WEIGHT_OPS for n in source.graph.node)
assert nbytes == peers.weight_bytes_per_token(path), (nbytes, peers.weight_bytes_per_token(path))
feeds = {{k: np.random.default_rng(7).standard_normal(v.shape, dtype=np.float32) for k, v in feeds.items()}}
weights = {{t.name: numpy_helper.to_array(t) for t in model.graph.initializer}}
outputs = dict(zip([o.name for o in model.graph.output], profile._session(model, 1).run(None, feeds)))
matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
assert matmuls
for n in matmuls:
    np.testing.assert_allclose(outputs[n.output[0]], feeds[n.input[0]] @ weights[n.input[1]], rtol=1e-4, atol=1e-5)
"""
    _run(["-c", check])


def test_bandwidth_readers_read_the_whole_buffer():
    """The decode bound's readers (the full run interleaves one with the decoders; the smoke
    presets fit in cache, so the smoke pass never does): every reader runs, reports the
    buffer it reads, and the interleaved call reads it `passes` times."""
    check = """
from benchmarks import peers
found = peers.memory_bandwidth(1, 8 * 1024**2, repeat=2)
assert found["bytes"] == 8 * 1024**2, found["bytes"]
kernels = [k for k in found if k not in ("bytes", "threads", "best", "best_kernel")]
assert {"onnxruntime_gemv", "onnxruntime_reducesum", "numpy_sum"} <= set(kernels), kernels
assert all(found[k] > 0 for k in kernels) and found["best"] == max(found[k] for k in kernels)
for kernel in kernels:
    run, nbytes = peers.read_passes(1, 8 * 1024**2, kernel, passes=3)
    run()
    assert nbytes == 3 * 8 * 1024**2
"""
    _run(["-c", check])
