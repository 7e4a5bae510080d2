"""The U-Net export's graph rewrites: same outputs as diffusers, fewer and cheaper nodes,
standard operators only (the graph also feeds TensorRT)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from emu_edge.export.trt_check import check_graph
from emu_edge.export.specs import UNetSpec
from emu_edge.export.unet import _batch_free_target, optimize_unet_graph


def _tiny_unet(sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # Three levels: two upsamplers, cross-attention at the two coarse levels.
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
        attention_head_dim=4, norm_num_groups=8).eval()
    with torch.no_grad():
        # Non-trivial norm affines and output convolution (diffusers initialises some to
        # ones/zeros, which would hide a wrong channel order).
        for name, p in unet.named_parameters():
            if "norm" in name or "conv_out" in name:
                p.add_(0.3 * torch.randn_like(p))
    return unet


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported():
    unet = _tiny_unet()
    spec = UNetSpec.for_unet(unet, n_query=6)
    return unet, spec.build(unet), spec.build(unet, optimize=False), spec


@pytest.mark.parametrize("batch", [1, 2, 3, 6])
def test_optimized_graph_matches_diffusers(exported, batch):
    unet, model, _, spec = exported
    feeds = spec.sample_inputs(batch, seed=batch)
    with torch.no_grad():
        want = unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep")),
                    encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()
    got = _session(model).run(["noise_pred"], feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_rewrites_took_effect(exported):
    _, model, traced, spec = exported
    ops, before = Counter(n.op_type for n in model.graph.node), Counter(n.op_type for n in traced.graph.node)
    # Both upsamplers are sub-pixel convolutions, every GroupNorm affine one node.
    assert ops["Resize"] == 0 and before["Resize"] == 2
    assert ops["DepthToSpace"] == 2 and ops["Conv"] == before["Conv"] + 2 * 3
    assert ops["BatchNormalization"] == before["InstanceNormalization"] > 0
    # Shape bookkeeping is gone: what is left of it serves the timestep broadcast.
    assert ops["Shape"] <= 2 < before["Shape"]
    assert len(model.graph.node) < 0.6 * len(traced.graph.node)
    assert not check_graph(model, spec.profiles(), "unet"), "the graph must stay buildable by TensorRT"
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(model, full_check=True)


def _upsample_conv_graph(c_in, c_out, h, w, bias=True):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    conv_inputs = ["up", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", conv_inputs, ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("shape", [(5, 7, 3, 4, True), (8, 3, 6, 5, False)])
def test_subpixel_upsampling_is_the_same_convolution(shape):
    c_in, c_out, h, w, bias = shape
    model = _upsample_conv_graph(c_in, c_out, h, w, bias)
    x = np.random.default_rng(1).standard_normal((2, c_in, h, w)).astype(np.float32)
    want = _session(model).run(None, {"x": x})[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    optimize_unet_graph(rewritten, lambda b: {"x": np.zeros((b, c_in, h, w), np.float32)})
    assert [n.op_type for n in rewritten.graph.node] == ["Conv"] * 4 + ["Concat", "DepthToSpace"]
    got = _session(rewritten).run(None, {"x": x})[0]
    assert got.shape == (2, c_out, 2 * h, 2 * w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_other_resizes_are_left_alone():
    model = _upsample_conv_graph(4, 4, 3, 3)
    for attr in model.graph.node[0].attribute:
        if attr.name == "coordinate_transformation_mode":
            attr.s = b"half_pixel"   # not pixel repetition any more
    optimize_unet_graph(model, lambda b: {"x": np.zeros((b, 4, 3, 3), np.float32)})
    assert [n.op_type for n in model.graph.node] == ["Resize", "Conv"]


def test_batch_free_reshape_targets():
    # [B, S, C] -> [B, S, heads, dim]: batch copied from the input
    np.testing.assert_array_equal(_batch_free_target(np.array([2, 9, 4, 8]), np.array([3, 9, 4, 8]),
                                                     np.array([2, 9, 32]), np.array([3, 9, 32])), [0, 9, 4, 8])
    # [B, heads, S, dim] -> [B * heads, S, dim]: the one varying entry inferred
    np.testing.assert_array_equal(_batch_free_target(np.array([8, 9, 8]), np.array([12, 9, 8]),
                                                     np.array([2, 4, 9, 8]), np.array([3, 4, 9, 8])), [-1, 9, 8])
    # already a -1 and another varying entry: no constant form
    assert _batch_free_target(np.array([8, -1]), np.array([12, -1]), np.array([2, 4, 9]), np.array([3, 4, 9])) is None
