"""emu-edge quantize: each precision, the KV contract under MatMulNBits, the report, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from emu_edge.calibration.quantize import QuantizeError, QuantizeSettings, plan, quantize_bundle
from emu_edge.calibration.report import ReportSettings, _agreement, build_report, format_table, write_report
from emu_edge.cli import main
from emu_edge.runtime.backends import import_onnxruntime
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.pipeline import Pipeline

SMALL_REPORT = ReportSettings(captions=6, vqa=6, t2i=3, steps=3, batch=6, speed_repeats=1, threads=1)


@pytest.fixture(scope="module")
def calib(tiny_bundle, tmp_path_factory):
    from emu_edge.calibration.calibrate import CalibrateSettings, calibrate

    data = tmp_path_factory.mktemp("qdata")
    assert main(["data", "--split", "val", "--n", "18", "--size", "16", "--out", str(data)]) == 0
    return calibrate(tiny_bundle, data, tmp_path_factory.mktemp("qcalib") / "calib",
                     CalibrateSettings(max_new_tokens=6, steps=3, threads=1), log=lambda *a: None)


@pytest.fixture(scope="module")
def int4(tiny_bundle, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    path, results = quantize_bundle(tiny_bundle, out, QuantizeSettings(precision="int4", calibration=calib,
                                                                       threads=1), log=lambda *a: None)
    return path, results


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _io(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in list(model.graph.input) + list(model.graph.output)]


def test_int8_bundle(tiny_bundle, calib, tmp_path):
    out = tmp_path / "int8"
    # --precision int8 leaves the vision encoder in float (INT8 measured no faster there);
    # naming it asks for it.
    assert plan(Bundle.open(tiny_bundle).manifest, QuantizeSettings(precision="int8"))["vision_encoder"] == "fp32"
    assert main(["quantize", str(tiny_bundle), "--precision", "int8", "--graph", "vision_encoder=int8",
                 "--calibration", str(calib), "--out", str(out), "--threads", "1"]) == 0
    src, q = Bundle.open(tiny_bundle), Bundle.open(out)
    graphs = q.manifest.graphs
    assert {n: g.precision for n, g in graphs.items()} == {
        "decoder": "int8", "vision_encoder": "int8", "unet": "int8", "judge": "fp32"}
    # left alone: copied byte for byte
    assert graphs["judge"].sha256 == src.manifest.graphs["judge"].sha256
    for name in ("decoder", "vision_encoder", "unet"):
        before, after = onnx.load(str(src.graph_path(name))), onnx.load(str(q.graph_path(name)))
        assert _io(after) == _io(before), f"{name}: graph inputs and outputs must not change"
        assert graphs[name].ir_version <= 9 and after.ir_version <= 9
    decoder = onnx.load(str(q.graph_path("decoder")))
    nbits = [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(onnx.helper.get_attribute_value(a) == 8 for n in nbits for a in n.attribute if a.name == "bits")
    # The token table stays float at int8.
    assert not [n for n in decoder.graph.node if n.op_type == "GatherBlockQuantized"]
    assert graphs["decoder"].min_onnxruntime == "1.22"
    # Static QDQ only where it pays: the U-Net's INT8 weights all feed Convs, and its last
    # Conv, which writes the noise prediction, stays float.
    unet = onnx.load(str(q.graph_path("unet")))
    consumers = {i: n for n in unet.graph.node for i in n.input}
    weights = {t.name for t in unet.graph.initializer}
    dq_weights = [n.output[0] for n in unet.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                  and unet.graph.initializer[[t.name for t in unet.graph.initializer].index(n.input[0])].data_type
                  == onnx.TensorProto.INT8]
    assert dq_weights and {consumers[o].op_type for o in dq_weights} == {"Conv"}
    last = next(n for n in unet.graph.node if "noise_pred" in n.output)
    assert last.op_type == "Conv" and last.input[1] in weights
    assert graphs["unet"].extra["quantization"]["precision"] == "int8"
    pipe = Pipeline.load(out, threads=1)
    assert isinstance(pipe.generate_text([np.full((16, 16, 3), 200, np.uint8)], max_new_tokens=4), str)
    assert pipe.generate_image(["a red circle"], steps=2).size == (16, 16)


def _check_table(decoder: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """The token table's Gather is a 4-bit GatherBlockQuantized, its float table gone, and
    it gives every row of the source's table back within half a quantization step."""
    from onnx import numpy_helper

    from emu_edge.calibration.quantize import block_quantize

    gather = next(n for n in source.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    table = numpy_helper.to_array(next(t for t in source.graph.initializer if t.name == gather.input[0]))
    [node] = [n for n in decoder.graph.node if n.op_type == "GatherBlockQuantized"]
    assert node.input[1] == "input_ids" and gather.input[0] not in {t.name for t in decoder.graph.initializer}
    kept = {t.name: t for t in decoder.graph.initializer}
    assert kept[node.input[0]].data_type == onnx.TensorProto.UINT4
    # The graph's own rows (onnxruntime dequantizing), against the table, on fresh ids.
    graph = onnx.helper.make_graph([node], "table", [onnx.helper.make_tensor_value_info("input_ids", 7, [None])],
                                   [onnx.helper.make_tensor_value_info(node.output[0], 1, None)],
                                   [kept[name] for name in node.input if name in kept])
    model = onnx.helper.make_model(graph, opset_imports=list(decoder.opset_import))
    model.ir_version = decoder.ir_version
    ids = np.random.default_rng().integers(0, table.shape[0], 16)
    rows = import_onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids})[0]
    _, scales, _ = block_quantize(table, 4, 32)
    step = np.repeat(scales[ids], 32, axis=1)
    assert np.all(np.abs(rows - table[ids]) <= step / 2 + 1e-6) and np.abs(rows - table[ids]).max() > 0


def test_int4_decoder_keeps_the_kv_contract(int4, tiny_bundle):
    """MatMulNBits replaces weights only: the KV buffers bound in place still work, batched
    rows still match single ones, and every cached step stays close to FP32's logits."""
    path, _ = int4
    decoder = onnx.load(str(Bundle.open(path).graph_path("decoder")))
    # The output heads get 8 bits (their error would land in the outputs as is), the rest 4.
    bits = {n.name: a.i for n in decoder.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}
    assert len(bits) == 4 * 2 + 2   # qkv, o, gate|up, down x 2 layers; heads
    # project_up (visual embeddings in) stays float; the token table is 4-bit.
    assert [n.name for n in decoder.graph.node if n.op_type == "MatMul"] == ["project_up/MatMul"]
    assert {n for n, b in bits.items() if b == 8} == {"lm_head/MatMul_Q8", "project_down/MatMul_Q8"}
    _check_table(decoder, onnx.load(str(Bundle.open(tiny_bundle).graph_path("decoder"))))
    assert Bundle.open(path).manifest.graphs["decoder"].min_onnxruntime == "1.22"
    assert _io(decoder) == _io(onnx.load(str(Bundle.open(tiny_bundle).graph_path("decoder"))))
    pipe, fp32 = Pipeline.load(path, threads=1), Pipeline.load(tiny_bundle, threads=1)
    rows = [[1, 20, 31, 40], [1, 9, 17]]
    batched = pipe.generate_ids(rows, 8, ignore_eos=True)
    assert batched == [pipe.generate_ids(r, 8, ignore_eos=True) for r in rows]
    # Teacher-forced on FP32's tokens. The cache contract is checked exactly: every cached
    # int4 step equals int4's own uncached prefill of the same prefix. Closeness to FP32 is
    # a coarse bound: int4 moves each weight by up to half a step of 16 levels, and the
    # 20-step tiny model's logits are so flat (|logit| < 2) that this alone costs ~2% cosine.
    tokens = fp32.generate_ids(rows[0], 8, ignore_eos=True)
    sessions = [p.session(1) for p in (fp32, pipe)]
    outs = [s.prefill([rows[0]]) for s in sessions]
    prefix = list(rows[0])
    for token in tokens:
        a, b = outs[0].logits.ravel(), outs[1].logits.ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95
        uncached = pipe.session(1).prefill([prefix]).logits.ravel()
        np.testing.assert_allclose(b, uncached, rtol=0, atol=2e-3 * np.abs(uncached).max())
        outs = [s.step([token]) for s in sessions]
        prefix.append(token)


def test_fp16_runs_on_the_cpu_provider(tiny_bundle, tmp_path):
    out, _ = quantize_bundle(tiny_bundle, tmp_path / "fp16", QuantizeSettings(precision="fp16"), log=lambda *a: None)
    q = Bundle.open(out)
    assert q.manifest.model.kv.dtype == "float16"
    assert q.manifest.graphs["decoder"].input("past_key_values.0.key").dtype == "float16"
    assert q.manifest.graphs["decoder"].input("image_embeds").dtype == "float32"
    assert q.manifest.graphs["judge"].precision == "fp32"
    pipe, fp32 = Pipeline.load(out, threads=1), Pipeline.load(tiny_bundle, threads=1)
    prompt = [1, 20, 31, 40]
    assert pipe.generate_ids(prompt, 8, ignore_eos=True) == fp32.generate_ids(prompt, 8, ignore_eos=True)
    a = np.asarray(pipe.generate_image(["a red circle"], steps=3), np.int16)
    b = np.asarray(fp32.generate_image(["a red circle"], steps=3), np.int16)
    assert np.abs(a - b).max() <= 3


@pytest.mark.gpu
def test_fp16_on_gpu(tiny_bundle, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA GPU here: fp16 kernels that onnxruntime has only on CUDA are checked on GPU machines")
    out, _ = quantize_bundle(tiny_bundle, tmp_path / "fp16", QuantizeSettings(precision="fp16"), log=lambda *a: None)
    prompt = [1, 20, 31, 40]
    gpu = Pipeline.load(out, device="cuda").generate_ids(prompt, 8, ignore_eos=True)
    assert gpu == Pipeline.load(tiny_bundle).generate_ids(prompt, 8, ignore_eos=True)


def test_text_only_bundle_quantizes_without_calibration(llm_folders, tmp_path):
    bundle = tmp_path / "text"
    assert main(["export-hf", "--llm", str(llm_folders("gqa")), "--out", str(bundle)]) == 0
    fp32 = Pipeline.load(bundle, threads=1)
    prompt = [1, 20, 31, 40, 7]
    want = fp32.generate_ids(prompt, 12, ignore_eos=True)
    errors = {}
    for precision in ("int8", "int4"):
        out = tmp_path / precision
        assert main(["quantize", str(bundle), "--precision", precision, "--out", str(out)]) == 0
        assert Bundle.open(out).manifest.graphs["decoder"].precision == precision
        pipe = Pipeline.load(out, threads=1)
        got = pipe.generate_ids(prompt, 12, ignore_eos=True)
        logits = [p.session(1).prefill([prompt]).logits.ravel() for p in (fp32, pipe)]
        errors[precision] = np.linalg.norm(logits[1] - logits[0]) / np.linalg.norm(logits[0])
        if precision == "int8":
            assert _agreement([want], [got]) >= 0.95, (want, got)
    # Random weights (N(0, 0.2)) amplify weight noise through the layers, and their top
    # logits lie close together, so 4-bit greedy tokens drift here; what must hold is that
    # 4 bits err more than 8 and stay bounded. The shipped model's report checks agreement.
    assert errors["int8"] < 0.1 and errors["int8"] < errors["int4"] < 1.0, errors


def test_already_quantized_graphs_are_refused(int4, tmp_path):
    path, _ = int4
    with pytest.raises(QuantizeError, match="already int4"):
        quantize_bundle(path, tmp_path / "again", QuantizeSettings(precision="int4"), log=lambda *a: None)
    with pytest.raises(QuantizeError, match="already int8"):
        quantize_bundle(path, tmp_path / "again", QuantizeSettings(graphs={"unet": "fp16"}), log=lambda *a: None)
    # Graphs still in fp32 may be converted; the quantized ones are carried over as they are.
    out, _ = quantize_bundle(path, tmp_path / "vision16", QuantizeSettings(graphs={"vision_encoder": "fp16"}),
                             log=lambda *a: None)
    assert Bundle.open(out).manifest.graphs["decoder"].sha256 == Bundle.open(path).manifest.graphs["decoder"].sha256


@pytest.mark.parametrize("args, message", [
    (["--precision", "int3"], "valid precisions: fp32, fp16, int8, int4"),
    (["--graph", "decoder=int4,audio=int8"], "this bundle's graphs are: decoder, vision_encoder, unet, judge"),
    (["--graph", "unet=int4"], "valid precisions for unet: fp32, fp16, int8"),
    (["--precision", "int8", "--method", "kl", "--calibration", "CALIB"], "valid methods: minmax, entropy, percentile"),
    (["--precision", "int8"], "needs --calibration CALIB"),
    (["--graph", "decoder=int4", "--exclude", "decoder:no_such_node"], "has no node"),
    (["--graph", "decoder=int4", "--block-size", "24"], "power of two"),
])
def test_bad_requests_say_what_is_valid(tiny_bundle, calib, tmp_path, capsys, args, message):
    args = [str(calib) if a == "CALIB" else a for a in args]
    assert main(["quantize", str(tiny_bundle), "--out", str(tmp_path / "q"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_error_adding_nodes_are_kept_in_float(tiny_bundle, calib, tmp_path):
    settings = QuantizeSettings(graphs={"unet": "int8"}, calibration=calib, max_rel_error=1e-9, max_excluded=2,
                                threads=1)
    out, results = quantize_bundle(tiny_bundle, tmp_path / "q", settings, log=lambda *a: None)
    kept = results["unet"].auto_excluded
    assert len(kept) == 2
    assert kept == [n for n, _ in results["unet"].sensitive[:2]], "the two nodes adding the most error"
    unet = onnx.load(str(Bundle.open(out).graph_path("unet")))
    dq = {n.output[0] for n in unet.graph.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in unet.graph.node if n.op_type == "Conv"}
    assert all(convs[name].input[1] not in dq for name in kept), "excluded Convs keep float weights"
    # ... and so does the last Conv (it writes the graph's output); every other Conv is INT8.
    excluded = results["unet"].excluded
    assert excluded == ["/unet/conv_out/Conv"] + kept
    assert sum(c.input[1] in dq for c in convs.values()) == len(convs) - 3
    recorded = Bundle.open(out).manifest.graphs["unet"].extra["quantization"]
    assert recorded["auto_excluded_nodes"] == kept
    # The same nodes by hand, as the report's suggestion reads.
    manual, results = quantize_bundle(tiny_bundle, tmp_path / "manual", QuantizeSettings(
        graphs={"unet": "int8"}, calibration=calib, exclude={"unet": kept}, auto_exclude=False), log=lambda *a: None)
    assert results["unet"].excluded == kept + ["/unet/conv_out/Conv"]


def test_report(int4, tiny_bundle, calib, tmp_path):
    path, results = int4
    report = build_report(tiny_bundle, path, calib, SMALL_REPORT,
                          quantization={n: r.to_dict() for n, r in results.items()}, log=lambda *a: None)
    for name in ("decoder", "unet"):
        g = report["graphs"][name]
        assert 0.9 < g["cosine"] <= 1.0 and 0 < g["rel_error"] < 0.5 and g["samples"] == "held out"
    assert report["graphs"]["judge"]["identical"] and report["graphs"]["vision_encoder"]["identical"]
    assert report["token_agreement_prompts"] == 12 and 0 <= report["token_agreement"] <= 1
    for metric in ("caption_accuracy", "vqa_accuracy", "t2i_attribute_accuracy"):
        assert 0 <= report[metric] <= 1 and 0 <= report["fp32"][metric] <= 1
    assert 0.5 < report["image_similarity"] <= 1.0
    # Images as emu-edge eval draws them: the bundle's guidance unless the settings name one.
    guidance = SMALL_REPORT.guidance
    if guidance is None:
        guidance = Pipeline.load(tiny_bundle).image_defaults()["guidance"]
    assert report["t2i_generation"]["guidance"] == guidance
    assert report["targets"]["token_agreement"]["target"] == ">= 0.85"
    assert report["speed"]["decode_tokens_per_s"]["fp32"] > 0
    json_path, table_path = write_report(report, tmp_path / "int4.json")
    assert json.loads(json_path.read_text())["precisions"]["decoder"] == "int4"
    table = table_path.read_text()
    assert "token_agreement" in table and "unet" in table and table == format_table(report) + "\n"


def test_token_agreement_counts_positions_over_the_longer_sequence():
    assert _agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert _agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.75
    assert _agreement([[1, 2]], [[1, 2, 5, 6]]) == 0.5       # ran on past FP32's EOS
    assert _agreement([[1, 2, 3], [4]], [[1], [4]]) == 0.5


def test_quantized_bundles_are_made_and_loaded_torch_free(tiny_bundle, calib, tmp_path):
    """calibrate, quantize and the runtime in a process where torch cannot be imported."""
    data = json.loads((calib / "calibration.json").read_text())["data"]
    code = f"""
import sys
sys.modules["torch"] = None          # import torch now raises ImportError
from emu_edge.cli import main
assert main(["calibrate", {str(tiny_bundle)!r}, "--data", {data!r}, "--out", {str(tmp_path / 'c')!r},
             "--max-new-tokens", "2", "--steps", "2", "--threads", "1"]) == 0
assert main(["quantize", {str(tiny_bundle)!r}, "--precision", "int4", "--calibration", {str(tmp_path / 'c')!r},
             "--out", {str(tmp_path / 'q')!r}, "--threads", "1"]) == 0
from emu_edge.runtime.pipeline import Pipeline
print(Pipeline.load({str(tmp_path / 'q')!r}).generate_ids([1, 20, 31], 4, ignore_eos=True))
assert not any(m == "transformers" or m.startswith("torch.") for m in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_side_by_side_speed_and_placement_tools_run(int4, tiny_bundle, calib):
    """The measuring tools behind the figures in the report (figures are not asserted)."""
    from emu_edge.calibration.bench import compare, format_results
    from emu_edge.calibration.placement import compare_placements, format_placements

    path, _ = int4
    results = compare({"fp32": tiny_bundle, "int4": path}, calib, threads=1, tokens=8, repeats=1)
    assert set(results["int4"]["graphs_ms"]) == {"unet"}
    assert results["int4"]["precisions"]["decoder"] == "int4" and results["fp32"]["decode_tokens_per_s"] > 0
    assert "decode tokens/s" in format_results(results)
    placements = compare_placements(tiny_bundle, calib, "unet", {"Conv": ("Conv",), "MatMul": ("MatMul",)},
                                    threads=1, repeats=1, log=lambda *a: None)
    assert set(placements) == {"fp32", "Conv", "MatMul"}
    assert placements["fp32"]["rel_error"] == 0 and 0 < placements["Conv"]["rel_error"] < 0.5
    assert "quantized ops" in format_placements("unet", placements)
