"""The decoder graph is built straight into its external data file
(BundleWriter.spill): over the threshold the bundle keeps it, and runs as the single-file
bundle does; under it the graph is read back into one file, byte for byte what the
in-memory build gives."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from emu_edge.cli import main
from emu_edge.export import bundle_writer, hf_cli
from emu_edge.export.bundle_writer import DATA_ALIGNMENT, BundleWriteError, BundleWriter
from emu_edge.export.decoder import build_decoder
from emu_edge.export.specs import DecoderSpec
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.manifest import Manifest

MAX_LENGTH = 32


def _export(folder, out, threshold=None) -> Manifest:
    with pytest.MonkeyPatch.context() as m:
        if threshold is not None:
            m.setattr(hf_cli, "BundleWriter", functools.partial(BundleWriter, external_data_threshold=threshold))
        assert main(["export-hf", str(folder), "--out", str(out), "--max-length", str(MAX_LENGTH)]) == 0
    return Bundle.open(out).manifest   # hashes every file, the data files too


def _run(path, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


# "gqa": GroupQueryAttention, fused gate/up; "head24": standard attention
@pytest.mark.parametrize("preset", ["gqa", "head24"])
def test_a_forced_threshold_keeps_the_data_files_and_runs_the_same(llm_folders, tmp_path, monkeypatch, preset):
    # Small blocks: the transposed weights are written in many pieces.
    monkeypatch.setattr(bundle_writer, "BLOCK_BYTES", 1000)
    single = _export(llm_folders(preset), tmp_path / "single")
    split = _export(llm_folders(preset), tmp_path / "split", threshold=1)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [
        "decoder.onnx", "manifest.json", "tokenizer.json"]
    assert not single.graphs["decoder"].external_data
    assert [e["file"] for e in split.graphs["decoder"].external_data] == ["decoder.onnx.data"]
    graph = onnx.load(str(tmp_path / "split" / "decoder.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % DATA_ALIGNMENT == 0
                            for t in external)
    desc = hf_cli.load_llm(llm_folders(preset)).source.description
    inputs = DecoderSpec(desc, MAX_LENGTH, "auto").sample_inputs(batch=2)
    want = _run(tmp_path / "single" / "decoder.onnx", inputs)
    got = _run(tmp_path / "split" / "decoder.onnx", inputs)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_under_the_threshold_the_graphs_are_what_an_in_memory_build_saves(llm_folders, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_writer, "BLOCK_BYTES", 1000)
    _export(llm_folders("gqa"), tmp_path / "bundle")
    source = hf_cli.load_llm(llm_folders("gqa")).source
    model = build_decoder(source.description, source.weights, "gqa", MAX_LENGTH)
    assert (tmp_path / "bundle" / "decoder.onnx").read_bytes() == model.SerializeToString()


def test_a_graph_built_into_another_graphs_file_is_refused(llm_folders, tmp_path):
    source = hf_cli.load_llm(llm_folders("gqa")).source
    with BundleWriter(tmp_path / "bundle", log=lambda *_: None) as writer:
        model = build_decoder(source.description, source.weights, "gqa", MAX_LENGTH, spill=writer.spill("judge"))
        with pytest.raises(BundleWriteError, match="external data in 'judge.onnx.data'"):
            writer.add_graph("decoder", model, DecoderSpec(source.description, MAX_LENGTH, "gqa"))
    assert not list(tmp_path.iterdir())
