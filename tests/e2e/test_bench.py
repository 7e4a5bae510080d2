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
