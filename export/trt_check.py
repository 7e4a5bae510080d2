"""Can TensorRT build this graph? A static check that needs no GPU and no TensorRT.

It runs in CI on every graph meant for TensorRT and reports, per graph, what TensorRT's
ONNX parser would refuse, so a bundle is known to be buildable before it reaches a
device:

- operators outside the default ONNX domain (onnxruntime's contrib ops: the decoder's
  GroupQueryAttention, weight-only MatMulNBits), and default-domain operators the parser
  does not support;
- a default-domain opset outside the parser's range;
- Q/DQ nodes TensorRT's explicit quantization cannot take (unsigned or non-zero zero
  points: TensorRT quantizes symmetrically to signed INT8);
- axes and similar inputs that must be build-time constants;
- dynamic inputs without a min/opt/max shape profile in the manifest, and profiles that
  do not fit the input (rank, fixed dims, min <= opt <= max).

The operator list is the TensorRT 10 parser's support matrix (onnx-tensorrt
docs/operators.md, opsets 9-24).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

TRT_OPSETS = (9, 24)
# Roles of the graphs that run on TensorRT (emu2: vision_encoder, unet; emu3: vq_encoder,
# vq_decoder); the judge only scores images on the host.
TENSORRT_GRAPHS = ("decoder", "vision_encoder", "unet", "vq_encoder", "vq_decoder")

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# op -> index of an input that must be a build-time constant (initializer or Constant).
CONSTANT_INPUTS = {
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
                        "CumSum", "OneHot")},
}

CONTRIB_ADVICE = {
    "GroupQueryAttention": "export the decoder with --attention standard for TensorRT",
    "SkipSimplifiedLayerNormalization": "export the decoder with --attention standard for TensorRT",
    "MatMulNBits": "weight-only INT4/INT8 is onnxruntime's format; build engines from the fp32, fp16 or "
                   "static-INT8 (QDQ) bundle",
}


@dataclass
class Problem:
    graph: str
    where: str      # node or input name
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.where}: {self.message}"


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every value fixed before the graph runs: initializers and Constant node outputs."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
    return out


def check_graph(model: onnx.ModelProto, profiles: dict, name: str) -> list[Problem]:
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        problems.append(Problem(name, "opset", f"opset {opset} is outside TensorRT's {TRT_OPSETS[0]}-{TRT_OPSETS[1]}"))
    constants = constant_tensors(model)
    for node in model.graph.node:
        where = node.name or node.op_type
        if node.domain not in ("", "ai.onnx"):
            advice = CONTRIB_ADVICE.get(node.op_type, "TensorRT's parser reads only standard ONNX operators")
            problems.append(Problem(name, where, f"contrib operator {node.domain}.{node.op_type}: {advice}"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            problems.append(Problem(name, where, f"{node.op_type} is not supported by TensorRT's ONNX parser"))
            continue
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            problems.append(Problem(name, where, f"{node.op_type} input {index} ({node.input[index]}) must be a "
                                                 "build-time constant for TensorRT"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(name, where, node, constants)
    problems += _check_profiles(model, profiles, name)
    return problems


def _check_qdq(graph: str, where: str, node: onnx.NodeProto, constants) -> list[Problem]:
    if len(node.input) < 3 or not node.input[2]:
        return []   # no zero point: 0, and the type is int8 by default
    zero = constants.get(node.input[2])
    if zero is None:
        return [Problem(graph, where, "the zero point must be a constant for TensorRT")]
    if zero.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN):
        return [Problem(graph, where, f"{onnx.TensorProto.DataType.Name(zero.data_type)} zero point: TensorRT takes "
                                      "signed INT8 Q/DQ (quantize with emu-edge quantize --tensorrt)")]
    if onnx.numpy_helper.to_array(zero).any():
        return [Problem(graph, where, "non-zero zero point: TensorRT quantizes symmetrically "
                                      "(quantize with emu-edge quantize --tensorrt)")]
    return []


def _check_profiles(model: onnx.ModelProto, profiles: dict, name: str) -> list[Problem]:
    problems = []
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if None not in dims:
            continue
        profile = profiles.get(value.name)
        if profile is None:
            problems.append(Problem(name, value.name, f"input of shape {_shape(value)} has dynamic dimensions but no "
                                                      "min/opt/max shape profile in the manifest"))
            continue
        try:
            lo, opt, hi = (list(profile[k]) for k in ("min", "opt", "max"))
        except (KeyError, TypeError):
            problems.append(Problem(name, value.name, f"profile {profile} lacks min, opt or max"))
            continue
        if not len(lo) == len(opt) == len(hi) == len(dims):
            problems.append(Problem(name, value.name, f"profile ranks {len(lo)}/{len(opt)}/{len(hi)} differ from the "
                                                      f"input's rank {len(dims)}"))
            continue
        for axis, dim in enumerate(dims):
            if dim is not None and not lo[axis] == opt[axis] == hi[axis] == dim:
                problems.append(Problem(name, value.name, f"profile gives axis {axis} {lo[axis]}/{opt[axis]}/"
                                                          f"{hi[axis]} but the graph fixes it to {dim}"))
            elif not 0 <= lo[axis] <= opt[axis] <= hi[axis]:
                problems.append(Problem(name, value.name, f"profile axis {axis} needs 0 <= min <= opt <= max, got "
                                                          f"{lo[axis]}/{opt[axis]}/{hi[axis]}"))
    return problems


def _shape(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def tensorrt_graphs(manifest) -> list[str]:
    """The names of a bundle's graphs whose role runs on TensorRT, in TENSORRT_GRAPHS' order."""
    return [name for role in TENSORRT_GRAPHS for name, graph in manifest.graphs.items() if graph.role == role]


def check_bundle(bundle_path: str | Path, graphs: list[str] | None = None) -> dict[str, list[Problem]]:
    """Problems per TensorRT-targeted graph of a bundle (an empty list: buildable)."""
    from emu_edge.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_path, verify=False, onnxruntime_version=None)
    available = tensorrt_graphs(bundle.manifest)
    names = graphs or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown graph(s) {', '.join(unknown)}; TensorRT graphs of this bundle: {', '.join(available)}")
    out = {}
    for name in names:
        spec = bundle.manifest.graphs[name]
        model = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        out[name] = check_graph(model, spec.profiles, name)
    return out
