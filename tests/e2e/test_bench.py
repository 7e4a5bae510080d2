"""`emu-edge bench`: a quick pass over real bundles writes the table, JSON and PNG.

No timed assertions: the figures are checked for being present, finite and consistent
(p50 <= p90 <= p99, one entry per bundle), never for their size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from emu_edge.cli import main
from tiny_models import make_emu3_bundle


@pytest.fixture(scope="module")
def text_bundle(llm_folders, tmp_path_factory):
    """A text-only bundle (export-hf --llm): no vision encoder, regression or U-Net."""
    out = tmp_path_factory.mktemp("bench") / "text"
    assert main(["export-hf", "--llm", str(llm_folders("gqa")), "--out", str(out), "--max-length", "200"]) == 0
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def test_bench_writes_table_json_and_plot(tiny_bundle, text_bundle, tmp_path, capsys):
    report, plot = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    assert main(["bench", str(tiny_bundle), str(text_bundle), "--quick", "--threads", "1",
                 "--json", str(report), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for row in ("size on disk", "cold load", "decode per token", "tokens per second", "regression N=",
                "U-Net step (batch 2, CFG)", "caption end to end", "text-to-image", "peak RSS"):
        assert row in out, row

    data = json.loads(report.read_text())
    assert data["onnxruntime"] and data["machine"]["cpus"] >= 1
    multimodal, text = data["bundles"]
    assert multimodal["bundle"] == str(tiny_bundle) and text["bundle"] == str(text_bundle)
    for r in (multimodal, text):
        assert r["precision"]["decoder"] == "fp32"
        assert _finite(r["size_mb"]) and r["size_mb"] > 0 and _finite(r["load_s"])
        d = r["decode"]
        assert d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"]
        assert _finite(d["tokens_per_s"]) and d["tokens_per_s"] > 0
        assert all(_finite(v["median_ms"]) for v in r["prefill"].values())
        assert r["scaling"]["decode_step_ms_by_context"] and r["scaling"]["decode_by_batch"]
        assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 0
    for key in ("vision_encoder", "regression", "unet_step", "caption", "text_to_image"):
        assert _finite(multimodal[key]["median_ms"]), key
        assert key not in text  # a text-only bundle has none of these
    assert multimodal["regression"]["n"] == 4 and multimodal["unet_step"]["batch"] == 2
    assert multimodal["text_to_image"]["steps"] == 4  # --quick

    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_bench_emu3_bundle_measures_images_by_size(tmp_path, capsys):
    """An emu3 bundle: no emu2 rows; image generation at the default size (16x16 pixels,
    8x8 codes: image_area 256 at spatial factor 2) and half of it (--quick), each with its
    time, image token rate, peak RSS and KV cache; the plot gains the image panel."""
    bundle = make_emu3_bundle(tmp_path / "emu3", "f2", image_area=256)
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", str(bundle), "--quick", "--threads", "1", "--json", str(report), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for row in ("image generation", "image 16x16 (73 tokens)", "image 8x8 (21 tokens)", "image tokens/s"):
        assert row in out, row
    (r,) = json.loads(report.read_text())["bundles"]
    for key in ("vision_encoder", "regression", "unet_step", "caption", "text_to_image"):
        assert key not in r
    g = r["image_generation"]
    assert g["default"] == "16x16" and g["guidance"] == 3.0   # tiny_models' generation config
    assert list(g["by_size"]) == ["8x8", "16x16"]
    for size, v in g["by_size"].items():
        side = v["codes"]
        assert size == f"{side * 2}x{side * 2}" and v["tokens"] == side * (side + 1) + 1
        assert v["min_ms"] <= v["median_ms"] <= v["max_ms"] and 0 < v["vq_decode_ms"] < v["median_ms"]
        assert _finite(v["tokens_per_s"]) and v["tokens_per_s"] > 0
        assert v["peak_rss_mb"] is None or v["peak_rss_mb"] > 0
        # two rows (prompt and negative prompt) of the image's positions, the prompt's included
        assert 0 < v["kv_cache_bytes"] <= g["kv_cache_held_bytes"]
    small, large = g["by_size"].values()
    assert small["kv_cache_bytes"] < large["kv_cache_bytes"]
    assert r["peak_rss_mb"] is None or r["peak_rss_mb"] >= max(v["peak_rss_mb"] or 0 for v in g["by_size"].values())
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_bench_reports_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--repeat", "0"]) == 2


def test_bench_runs_without_torch(tiny_bundle, tmp_path):
    """A device has only the runtime: the verb must not import torch, even indirectly."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from emu_edge.cli import main\n"
            f"code = main(['bench', {str(tiny_bundle)!r}, '--quick', '--threads', '1', "
            f"'--json', {str(tmp_path / 'b.json')!r}])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "b.json").read_text())["bundles"][0]["decode"]["tokens_per_s"] > 0
