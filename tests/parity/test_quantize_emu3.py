"""emu-edge calibrate and quantize on an emu3 bundle: what is recorded, int8 and int4
variants through the CLI, and their accuracy report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from emu_edge.calibration.calibrate import Calibration
from emu_edge.calibration.quantize import QuantizeSettings, plan
from emu_edge.cli import main
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.pipeline import Pipeline

# int8 also asks for the VQ decoder in int8, which --precision alone leaves in fp32.
VARIANTS = {"int8": ["--precision", "int8", "--graph", "vq_decoder=int8"], "int4": ["--precision", "int4"]}


@pytest.fixture(scope="module")
def calib(emu3_bundle, tmp_path_factory):
    """9 validation records (one of each task) at 16 px: 8x8 codes of the f2 VQ."""
    data = tmp_path_factory.mktemp("emu3_data")
    assert main(["data", "--split", "val", "--n", "9", "--size", "16", "--out", str(data)]) == 0
    out = tmp_path_factory.mktemp("emu3_calib") / "calib"
    assert main(["calibrate", str(emu3_bundle), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
                 "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def variants(emu3_bundle, calib, tmp_path_factory):
    """precision -> (bundle, report), both through `emu-edge quantize --report`."""
    root = tmp_path_factory.mktemp("emu3_q")
    out = {}
    for precision, args in VARIANTS.items():
        report = root / f"{precision}.json"
        assert main(["quantize", str(emu3_bundle), *args, "--calibration", str(calib), "--out", str(root / precision),
                     "--report", str(report), "--report-prompts", "3", "--threads", "1"]) == 0
        out[precision] = root / precision, json.loads(report.read_text())
    return out


def test_calibration_records_the_vq_graphs_and_the_image_loop(calib):
    c = Calibration.load(calib)
    assert {"decoder", "vq_encoder", "vq_decoder"} <= set(c.graphs)
    # Every input image went through the VQ encoder as the processor sizes it (16 px here).
    encoder = c.meta("vq_encoder")
    assert {m["task"] for m in encoder} == {"captioning", "vqa", "fewshot", "chat", "video", "digits"}
    assert all(f["pixel_values"].shape == (1, 3, 16, 16) for f in c.samples("vq_encoder"))
    # The decoder through the image-token loop (cond and uncond rows in one call), then the
    # VQ decoder on its codes: the bundle's default 3x3.
    image_steps = [f for m, f in zip(c.meta("decoder"), c.samples("decoder")) if m["task"] == "text_to_image"]
    assert len(image_steps) == 3 * 4 + 1 and all(f["seqlens_k"].shape == (2,) for f in image_steps)
    assert [f["codes"].shape for f in c.samples("vq_decoder")] == [(1, 3, 3)]
    assert [m["task"] for m in c.meta("vq_decoder")] == ["text_to_image"]
    # Emu3 does not edit images: the subject record is skipped, not recorded half-way.
    assert not any(m["task"] == "subject" for g in c.graphs for m in c.meta(g))


def test_int8_and_int4_leave_the_vq_graphs_in_fp32(emu3_bundle):
    manifest = Bundle.open(emu3_bundle).manifest
    for precision in VARIANTS:
        targets = plan(manifest, QuantizeSettings(precision=precision))
        assert (targets["decoder"], targets["vq_encoder"], targets["vq_decoder"]) == (precision, "fp32", "fp32")


@pytest.mark.parametrize("precision", VARIANTS)
def test_the_variants_graphs(variants, emu3_bundle, precision):
    path, _ = variants[precision]
    source, bundle = Bundle.open(emu3_bundle), Bundle.open(path)
    decoder = onnx.load(str(bundle.graph_path("decoder")))
    bits = [a.i for n in decoder.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    # Every weight MatMul is MatMulNBits but those the error loop kept in float.
    kept = bundle.manifest.graphs["decoder"].extra["quantization"].get("excluded_nodes", [])
    assert sorted(n.name for n in decoder.graph.node if n.op_type == "MatMul") == sorted(kept)
    assert len(bits) + len(kept) == 4 * 2 + 1        # qkv, o, gate|up, down x 2 layers; lm_head
    assert set(bits) == ({8} if precision == "int8" else {4, 8})   # int4 gives the lm_head 8 bits
    assert bundle.manifest.graphs["vq_encoder"].sha256 == source.manifest.graphs["vq_encoder"].sha256
    vq_decoder = bundle.manifest.graphs["vq_decoder"]
    if precision == "int4":
        assert vq_decoder.sha256 == source.manifest.graphs["vq_decoder"].sha256
        return
    # Static QDQ on the Convs; the last one, which writes the pixels, stays float.
    model = onnx.load(str(bundle.graph_path("vq_decoder")))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert vq_decoder.precision == "int8" and "pixels" not in dequantized
    assert [c.input[1] in dequantized for c in convs].count(False) == 1 + len(vq_decoder.extra["quantization"].get(
        "auto_excluded_nodes", []))


def test_a_trained_models_agreement_gets_a_verdict():
    from emu_edge.calibration.report import _targets

    report = {"precisions": {"decoder": "int4"}, "fp32": {"answer_accuracy": 0.9},
              "text_token_agreement": 0.95, "image_token_agreement": 0.85}
    targets = _targets(report, "int4")
    assert targets["text_token_agreement"] == {"target": ">= 0.9", "value": 0.95, "met": True}
    assert targets["image_token_agreement"] == {"target": ">= 0.9", "value": 0.85, "met": False}
    assert _targets({**report, "fp32": {"answer_accuracy": 0.4}}, "int4")["text_token_agreement"]["met"] is None


@pytest.mark.parametrize("precision", VARIANTS)
def test_report(variants, precision):
    path, report = variants[precision]
    assert report["precisions"]["decoder"] == precision
    for metric in ("text_token_agreement", "image_token_agreement"):
        assert 0 <= report[metric] <= 1
        # The fp32 bundle scored on its own greedy tokens, teacher forced: exactly what its
        # generating loop chose, or the forcing is misaligned.
        assert report["fp32"][metric] == 1.0
        target = report["targets"][metric]
        # Random weights answer nothing right: the trained model's target gets no verdict.
        assert report["fp32"]["answer_accuracy"] < 0.5
        assert target["met"] is None and target["verdict"] == "n/a" and "random weights" in target["note"]
        assert target["target"] == (">= 0.99" if precision == "int8" else ">= 0.9")
    assert report["text_token_agreement_prompts"] == 6 and report["text_token_agreement_tokens"] > 6
    # 3 prompts of 3x3 codes: 9 scored positions each (row ends and EOF are forced).
    assert report["image_token_agreement_prompts"] == 3 and report["image_token_agreement_tokens"] == 27
    assert report["image_generation"]["codes"] == [3, 3]
    vq = report["image_difference"]["vq_decoder"]
    if precision == "int4":   # vq_decoder copied: the same codes give the same pixels
        assert report["graphs"]["vq_decoder"]["identical"] and vq["pixel_mae"] == 0 and vq["psnr_db"] is None
    else:
        assert 0 < report["graphs"]["vq_decoder"]["rel_error"] < 0.5 and vq["pixel_mae"] > 0 and vq["psnr_db"] > 0
        assert report["speed"]["graphs_ms"]["vq_decoder"]["fp32"] > 0
    e2e = report["image_difference"]["end_to_end"]
    assert 0 <= e2e["same_image_tokens"] <= 1 and e2e["pixel_mae"] >= 0
    assert (e2e["psnr_db"] is None) == (e2e["pixel_mae"] == 0)
    bundle = Bundle.open(path)
    on_disk = {}
    for name, graph in bundle.manifest.graphs.items():
        files = [graph.file] + [e["file"] for e in graph.external_data]
        on_disk[name] = sum((path / f).stat().st_size for f in files) / 1e6
        assert report["graphs"][name]["size_mb"]["variant"] == pytest.approx(on_disk[name], abs=1e-3)
    assert report["size_mb"]["variant"] == pytest.approx(sum(on_disk.values()), abs=5e-3)
    assert report["size_mb"]["variant"] < report["size_mb"]["fp32"]
    for rate in ("decode_tokens_per_s", "image_tokens_per_s"):
        assert report["speed"][rate]["fp32"] > 0 and report["speed"][rate]["variant"] > 0
    assert report["graphs"]["decoder"]["samples"] == "held out"
    table = (path.parent / f"{precision}.txt").read_text()
    for row in ("text_token_agreement", "image_token_agreement", "vq_decoder images", "end_to_end images",
                "image tokens/s", "n/a: Emu3 agreement targets"):
        assert row in table


def test_teacher_forced_image_tokens_must_keep_the_row_ends(emu3_bundle):
    pipe = Pipeline.load(emu3_bundle, threads=1)
    ids = pipe.image_ids(["w5 w6"], top_k=1)
    assert np.array_equal(pipe.image_top1(["w5 w6"], ids), ids)   # greedy: its own top-1 everywhere
    ids[0, 3] = ids[0, 0]            # position 3 ends the first row of 3 codes: EOL, not a code
    with pytest.raises(ValueError, match=r"ids\[:, 3\] must be"):
        pipe.image_top1(["w5 w6"], ids)
