"""TensorRT: the compatibility check and the engine cache run everywhere; building and
running engines needs TensorRT and a GPU and is skipped without them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from emu_edge.cli import main
from emu_edge.export.tensorrt import EngineBuildError, plan_engine
from emu_edge.export.trt_check import check_bundle, check_graph
from emu_edge.runtime.backends import BackendError, create_backend
from emu_edge.runtime.tensorrt import (EngineCache, EngineCacheError, EngineKey, Environment, ort_tensorrt_provider,
                                       sha256_file)

NO_TENSORRT = ("TensorRT cannot be installed on these machines (MEASURED.md: its wheels download from NVIDIA's "
               "index, which is unreachable, and need a GPU); engines are built and run on GPU machines")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason=NO_TENSORRT)

ORIN = Environment("10.3.0", "Orin", "8.7")
A100 = Environment("10.7.0", "NVIDIA A100-SXM4-80GB", "8.0")


@pytest.fixture(scope="module")
def standard_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "standard"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--attention", "standard"]) == 0
    return out


# -- the compatibility check -----------------------------------------------------------------


def test_standard_bundle_is_buildable(standard_bundle, capsys):
    problems = check_bundle(standard_bundle)
    assert set(problems) == {"decoder", "vision_encoder", "unet"}
    assert all(not p for p in problems.values()), problems
    assert main(["build-engines", str(standard_bundle), "--check"]) == 0
    assert "decoder: ok" in capsys.readouterr().out


def test_emu3_standard_bundle_is_buildable(tmp_path, capsys):
    """All three graphs of an emu3 bundle (decoder, vq_encoder, vq_decoder) pass the
    check when the decoder is exported with standard attention; the default (gqa) decoder
    is caught as the emu2 one is."""
    from tiny_models import make_emu3_bundle

    bundle = make_emu3_bundle(tmp_path / "standard", "f2", "--attention", "standard")
    problems = check_bundle(bundle)
    assert list(problems) == ["decoder", "vq_encoder", "vq_decoder"]
    assert all(not p for p in problems.values()), problems
    capsys.readouterr()
    assert main(["build-engines", str(bundle), "--check"]) == 0
    out = capsys.readouterr().out
    assert "vq_encoder: ok" in out and "vq_decoder: ok" in out
    assert main(["build-engines", str(bundle), "--check", "--graphs", "vq_decoder"]) == 0

    gqa = check_bundle(make_emu3_bundle(tmp_path / "gqa", "f2", "--attention", "gqa"))
    assert any("GroupQueryAttention" in p.message for p in gqa["decoder"])
    assert not gqa["vq_encoder"] and not gqa["vq_decoder"]


def test_contrib_operators_are_caught(tiny_bundle, tmp_path, capsys):
    problems = check_bundle(tiny_bundle)
    # The "gqa" decoder's onnxruntime-only ops, each with the way out.
    found = {op for p in problems["decoder"] for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")
             if op in p.message}
    assert found == {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    assert all("--attention standard" in p.message for p in problems["decoder"])
    assert not problems["unet"]
    out = tmp_path / "int4"
    assert main(["quantize", str(tiny_bundle), "--graph", "decoder=int4", "--out", str(out)]) == 0
    assert any("MatMulNBits" in p.message for p in check_bundle(out)["decoder"])
    assert main(["build-engines", str(out), "--check"]) == 1
    assert "MatMulNBits" in capsys.readouterr().out


def _graph(nodes, inputs, outputs, initializers=(), opset=17):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_each_rule_catches_a_graph_that_breaks_it():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    ok = {"x": {"min": [1, 4], "opt": [2, 4], "max": [8, 4]}}
    relu = _graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y])
    assert check_graph(relu, ok, "g") == []
    # an operator the parser lacks
    unique = _graph([helper.make_node("Unique", ["x"], ["y"], name="unique")], [x], [y])
    assert "not supported" in check_graph(unique, ok, "g")[0].message
    # dynamic input without a profile; and profiles that do not fit the input
    assert "no min/opt/max shape profile" in check_graph(relu, {}, "g")[0].message
    assert "rank" in check_graph(relu, {"x": {"min": [1], "opt": [1], "max": [8]}}, "g")[0].message
    assert "fixes it to 4" in check_graph(relu, {"x": {"min": [1, 4], "opt": [2, 4], "max": [8, 5]}}, "g")[0].message
    assert "min <= opt <= max" in check_graph(relu, {"x": {"min": [4, 4], "opt": [2, 4], "max": [8, 4]}},
                                              "g")[0].message
    # unsigned / non-zero zero points
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    for zero, message in ((np.array(128, np.uint8), "UINT8 zero point"), (np.array(3, np.int8), "non-zero")):
        qdq = _graph([helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
                      helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq")], [x], [y],
                     [scale, numpy_helper.from_array(zero, "zero")])
        found = check_graph(qdq, ok, "g")
        assert len(found) == 2 and message in found[0].message
    # axes computed at run time
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    reduce = _graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")], [x, axes], [y])
    assert "build-time constant" in check_graph(reduce, ok, "g")[0].message
    # contrib domain and opset range
    contrib = _graph([helper.make_node("FastGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")], [x], [y])
    assert "contrib operator com.microsoft.FastGelu" in check_graph(contrib, ok, "g")[0].message
    assert "opset 8" in check_graph(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=8), ok,
                                    "g")[0].message


def test_qdq_bundles_pass_only_in_the_tensorrt_form(tiny_bundle, standard_bundle, tmp_path):
    from emu_edge.calibration.calibrate import CalibrateSettings, calibrate

    data = tmp_path / "data"
    assert main(["data", "--split", "val", "--n", "9", "--size", "16", "--out", str(data)]) == 0
    calib = calibrate(standard_bundle, data, tmp_path / "calib", CalibrateSettings(max_new_tokens=2, steps=2),
                      log=lambda *a: None)
    for flag, clean in (([], False), (["--tensorrt"], True)):
        out = tmp_path / f"q{len(flag)}"
        assert main(["quantize", str(standard_bundle), "--graph", "unet=int8", "--calibration", str(calib),
                     "--out", str(out), *flag]) == 0
        assert (not check_bundle(out)["unet"]) == clean


# -- engine plans ----------------------------------------------------------------------------


def test_engine_plans_follow_the_graph_types():
    assert plan_engine("unet", "fp16", "fp16", 10).strongly_typed
    int8 = plan_engine("unet", "int8", "int8", 10)
    assert int8.strongly_typed and int8.precision == "int8" and not int8.flags
    weak = plan_engine("decoder", "fp32", "fp16", 10)
    assert not weak.strongly_typed and weak.flags == ["FP16"] and weak.precision == "fp16"
    assert "no Q/DQ" in plan_engine("decoder", "fp32", "int8", 10).note
    with pytest.raises(EngineBuildError, match="quantize the bundle first"):
        plan_engine("decoder", "fp32", "fp16", 11)
    with pytest.raises(EngineBuildError, match="INT8 only"):
        plan_engine("unet", "int8", "fp16", 10)
    with pytest.raises(EngineBuildError, match="valid: fp16, int8"):
        plan_engine("unet", "fp16", "int4", 10)
    with pytest.raises(EngineBuildError, match="int4"):
        plan_engine("decoder", "int4", "int8", 10)


# -- the engine cache index ------------------------------------------------------------------


def test_engine_cache_index(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    sha = "ab" * 32
    entry = cache.add(EngineKey.of(ORIN, "fp16", sha), b"engine-fp16", "unet", {"sample": {"min": [2]}})
    cache.add(EngineKey.of(ORIN, "int8", sha), b"engine-int8", "unet")
    cache.add(EngineKey.of(A100, "fp16", sha), b"engine-a100", "unet")
    index = json.loads((tmp_path / "engines" / "index.json").read_text())
    assert len(index["engines"]) == 3
    assert entry["tensorrt_version"] == "10.3.0" and entry["compute_capability"] == "8.7"
    assert not list((tmp_path / "engines").glob(".*")), "no temporary files left behind"
    # int8 is preferred, a precision can be asked for, and the bytes come back intact
    assert cache.select(sha, ORIN, "unet")["precision"] == "int8"
    chosen = cache.select(sha, ORIN, "unet", "fp16")
    assert cache.engine_path(chosen).read_bytes() == b"engine-fp16"
    # the same key replaces its engine
    cache.add(EngineKey.of(ORIN, "fp16", sha), b"rebuilt", "unet")
    assert len(cache.entries()) == 3
    assert cache.engine_path(cache.select(sha, ORIN, "unet", "fp16")).read_bytes() == b"rebuilt"
    assert cache.timing_cache_path(ORIN) != cache.timing_cache_path(A100)


def test_mismatched_engines_are_refused_with_what_to_do(tmp_path):
    cache = EngineCache(tmp_path)
    sha = "cd" * 32
    cache.add(EngineKey.of(ORIN, "fp16", sha), b"x", "decoder")
    newer_trt = Environment("10.7.0", "Orin", "8.7")
    with pytest.raises(EngineCacheError) as e:
        cache.select(sha, newer_trt, "decoder")
    message = str(e.value)
    assert "TensorRT 10.3.0 on Orin" in message and "TensorRT 10.7.0" in message and "build-engines" in message
    with pytest.raises(EngineCacheError, match="another machine"):
        cache.select(sha, A100, "decoder")
    with pytest.raises(EngineCacheError, match="not in int8"):
        cache.select(sha, ORIN, "decoder", "int8")
    with pytest.raises(EngineCacheError, match="no TensorRT engine for the unet graph"):
        cache.select("ef" * 32, ORIN, "unet")
    # a tampered engine file, and a corrupt index
    entry = cache.select(sha, ORIN, "decoder")
    (tmp_path / entry["file"]).write_bytes(b"y")
    with pytest.raises(EngineCacheError, match="does not match its sha256"):
        cache.engine_path(entry)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(EngineCacheError, match="not valid JSON"):
        cache.entries()


def test_engine_key_is_stable_and_checked():
    key = EngineKey.of(ORIN, "fp16", "00" * 32)
    assert key.id() == EngineKey.of(ORIN, "fp16", "00" * 32).id() != EngineKey.of(A100, "fp16", "00" * 32).id()
    assert key.environment == ORIN
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        EngineKey.of(ORIN, "int4", "00")


def test_onnxruntime_tensorrt_provider_options(standard_bundle, tmp_path):
    from emu_edge.runtime.bundle import Bundle

    bundle = Bundle.open(standard_bundle)
    name, options = ort_tensorrt_provider(bundle.graph_path("unet"), cache=EngineCache(tmp_path))
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"].startswith(str(tmp_path))
    assert "trt_fp16_enable" not in options, "an fp32 graph stays fp32"
    unet = bundle.manifest.graphs["unet"].profiles
    c, s = unet["sample"]["max"][1], unet["sample"]["max"][2]
    assert f"sample:{unet['sample']['max'][0]}x{c}x{s}x{s}" in options["trt_profile_max_shapes"]
    assert options["trt_profile_min_shapes"].count(":") == len(unet)


def test_tensorrt_backend_needs_a_gpu_and_says_so(standard_bundle):
    from emu_edge.runtime.bundle import Bundle

    path = Bundle.open(standard_bundle).graph_path("unet")
    with pytest.raises(BackendError, match="device='cuda'"):
        create_backend(path, backend="tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match="TensorRT"):
            create_backend(path, backend="tensorrt", device="cuda")


# -- on a GPU with TensorRT ----------------------------------------------------------------------


@pytest.mark.gpu
@needs_tensorrt
def test_engines_match_onnxruntime(standard_bundle, tmp_path, monkeypatch):
    from emu_edge.export.tensorrt import build_engines
    from emu_edge.runtime.pipeline import Pipeline

    monkeypatch.setenv("EMU_EDGE_ENGINE_CACHE", str(tmp_path / "engines"))
    entries = build_engines(standard_bundle, "fp16")
    assert {e["graph"] for e in entries} == {"decoder", "vision_encoder", "unet"}
    trt_pipe = Pipeline.load(standard_bundle, device="cuda", backend="tensorrt")
    ort_pipe = Pipeline.load(standard_bundle)
    prompt = [1, 20, 31, 40]
    assert trt_pipe.generate_ids(prompt, 12, ignore_eos=True) == ort_pipe.generate_ids(prompt, 12, ignore_eos=True)
    a = np.asarray(trt_pipe.generate_image(["a red circle"], steps=4), np.int16)
    b = np.asarray(ort_pipe.generate_image(["a red circle"], steps=4), np.int16)
    assert np.abs(a - b).mean() < 2


@pytest.mark.gpu
@needs_tensorrt
def test_emu3_engines_match_onnxruntime(tmp_path, monkeypatch):
    """An emu3 bundle with the standard-ops decoder: every graph becomes an engine. Teacher
    forced on onnxruntime's greedy image tokens, the engine's logits stay within fp16's
    rounding of onnxruntime's at every step, and the VQ decoder draws the same codes alike."""
    from tiny_models import make_emu3_bundle

    from emu_edge.export.tensorrt import build_engines
    from emu_edge.runtime.pipeline import Pipeline

    monkeypatch.setenv("EMU_EDGE_ENGINE_CACHE", str(tmp_path / "engines"))
    bundle = make_emu3_bundle(tmp_path / "standard", "f2", "--attention", "standard")
    entries = build_engines(bundle, "fp16")
    assert {e["graph"] for e in entries} == {"decoder", "vq_encoder", "vq_decoder"}
    trt_pipe = Pipeline.load(bundle, device="cuda", backend="tensorrt")
    ort_pipe = Pipeline.load(bundle)
    ids = ort_pipe.image_ids(["a red circle"], 16, 16, guidance=1.0, top_k=1)
    sessions = [p.session(1) for p in (trt_pipe, ort_pipe)]
    outs = [s.prefill([ort_pipe.image_prompt("a red circle", 2, 2)]) for s in sessions]
    for token in ids[0, :-1]:
        got, want = outs[0].logits, outs[1].logits
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
        outs = [s.step([token]) for s in sessions]
    a, b = (np.asarray(p.decode_image_ids(ids, 2, 2)[0], np.int16) for p in (trt_pipe, ort_pipe))
    assert np.abs(a - b).mean() < 2


@pytest.mark.gpu
@needs_tensorrt
def test_engine_from_another_machine_is_refused_not_crashed(standard_bundle, tmp_path, monkeypatch):
    from emu_edge.runtime.bundle import Bundle

    monkeypatch.setenv("EMU_EDGE_ENGINE_CACHE", str(tmp_path))
    path = Bundle.open(standard_bundle).graph_path("unet")
    EngineCache(tmp_path).add(EngineKey.of(A100, "fp16", sha256_file(path)), b"not-for-here", "unet")
    with pytest.raises(EngineCacheError, match="build-engines"):
        create_backend(path, backend="tensorrt", device="cuda")
