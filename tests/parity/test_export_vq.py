"""Emu3's VQ graphs against transformers' Emu3VQVAE: identical codes, pixels within 1e-4,
buildable by TensorRT, described in the manifest by their specs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.export.target import IR_VERSION, MAX_BATCH, OPSET
from emu_edge.export.trt_check import check_graph
from emu_edge.export.vq import VQDecoderSpec, VQEncoderSpec, VQSettings
from tests.tiny_models import VQ_PRESETS, build_vq

MAX_SIDE = 64


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(VQ_PRESETS))
def exported(request):
    vq = build_vq(request.param)
    settings = VQSettings.from_config(vq.config)
    encoder, decoder = VQEncoderSpec(settings, MAX_SIDE), VQDecoderSpec(settings, MAX_SIDE)
    graphs = {"vq_encoder": (encoder, encoder.build(vq)), "vq_decoder": (decoder, decoder.build(vq))}
    assert not any(m.training for m in vq.modules()), "export must leave the model in eval mode"
    return vq, settings, graphs


def test_settings_come_from_the_config(exported):
    vq, settings, _ = exported
    c = vq.config
    assert settings.spatial_factor == vq.vision_spatial_factor == 2 ** (len(c.channel_multiplier) - 1)
    assert (settings.temporal_factor, settings.codebook_size, settings.embed_dim) == (
        c.temporal_downsample_factor, c.codebook_size, c.embed_dim)


# (batch, code rows, code columns): non-square both ways, and other than the traced 8 x 12
@pytest.mark.parametrize("shape", [(2, 8, 12), (1, 5, 3), (3, 4, 4)])
def test_codes_identical_to_encode(exported, shape):
    vq, settings, graphs = exported
    spec, model = graphs["vq_encoder"]
    b, h, w = shape
    f = settings.spatial_factor
    pixels = spec.sample_inputs(b, seed=sum(shape), height=h * f, width=w * f)["pixel_values"]
    with torch.no_grad():
        out = vq.encode(torch.from_numpy(pixels), torch.tensor([[h * f, w * f]] * b))
    want = torch.stack(out.image_tokens).numpy()   # encode returns one [h, w] tensor per image
    got = _session(model).run([spec.names["codes"]], {spec.names["pixel_values"]: pixels})[0]
    assert got.dtype == np.int64 and got.shape == want.shape == (b, h, w)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 3, "codes should spread over the codebook"


@pytest.mark.parametrize("shape", [(2, 8, 12), (1, 5, 3), (3, 4, 4)])
def test_pixels_match_decode(exported, shape):
    vq, settings, graphs = exported
    spec, model = graphs["vq_decoder"]
    b, h, w = shape
    codes = spec.sample_inputs(b, seed=sum(shape), height=h, width=w)["codes"]
    with torch.no_grad():
        want = vq.decode(torch.from_numpy(codes)).numpy()   # an image: frame 0 of the video, [B, 3, H, W]
    got = _session(model).run([spec.names["pixels"]], {spec.names["codes"]: codes})[0]
    f = settings.spatial_factor
    assert got.dtype == np.float32 and got.shape == want.shape == (b, 3, h * f, w * f)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_graphs_are_buildable_by_tensorrt(exported):
    _, _, graphs = exported
    for role, (spec, model) in graphs.items():
        assert not check_graph(model, spec.profiles(), role)
        assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
        assert "If" not in {n.op_type for n in model.graph.node}


def test_bundle_entries(exported, tmp_path):
    _, settings, graphs = exported
    s = MAX_SIDE // settings.spatial_factor
    with BundleWriter(tmp_path / "bundle", log=lambda *a: None) as writer:
        for role, (spec, model) in graphs.items():
            writer.add_graph(role, model, spec)
        enc, dec = writer.graphs["vq_encoder"], writer.graphs["vq_decoder"]
        assert (enc.role, enc.names, enc.precisions) == ("vq_encoder", VQEncoderSpec.names, ["fp32", "fp16"])
        assert (dec.role, dec.names, dec.precisions) == ("vq_decoder", VQDecoderSpec.names, ["fp32", "fp16", "int8"])
        assert [(i.name, i.dtype, i.shape) for i in enc.outputs] == [("codes", "int64", ["batch", "code_height",
                                                                                         "code_width"])]
        assert [(i.name, i.dtype) for i in dec.inputs] == [("codes", "int64")]
        assert dec.profiles["codes"] == {"min": [1, 1, 1], "opt": [1, s, s], "max": [MAX_BATCH, s, s]}
        assert enc.profiles["pixel_values"]["max"] == [MAX_BATCH, 3, MAX_SIDE, MAX_SIDE]
    assert not (tmp_path / "bundle").exists()   # never finished: nothing written in place
