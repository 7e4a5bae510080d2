"""`emu-edge quantize`: a new bundle with some graphs in INT8, INT4 or FP16.

Precision is per graph (DESIGN.md), and each graph gets the method that pays on it:

    vision_encoder, unet,  int8: static QDQ (onnxruntime.quantization.quantize_static) on
    vq_decoder             the op types in STATIC_INT8_OPS, activation ranges from a
                           calibration folder (emu-edge calibrate), per-channel weights
    decoder                int8 / int4: weight-only, MatMul -> com.microsoft.MatMulNBits with
                           a block size (no calibration), at int4 the token table's Gather
                           -> com.microsoft.GatherBlockQuantized (4-bit); the KV
                           inputs and outputs, their in-place binding and the graph's I/O
                           are untouched
    every graph            fp16: float16 weights and compute, float32 I/O except the
                           decoder's KV buffers, which become float16 (the manifest says so)

`--precision P` sets every graph to P where the graph has P and it pays (int4 -> int8
for graphs without 4-bit kernels; the vision encoder whose INT8
measured no faster and Emu3's VQ graphs (NOT_INT8_BY_DEFAULT) stay fp32 under int8/int4),
`--graph name=P,...` sets single graphs.
The judge is never quantized: it is the yardstick. Graphs left in their precision are
copied byte for byte (same sha256); a graph that is already quantized is refused rather
than quantized twice.

Layers that break accuracy are kept in float: after quantizing a graph its error on
calibration samples is measured, and while it exceeds --max-rel-error the nodes that add
the most error (calibration.sensitivity) are excluded and the graph re-quantized, up to
--max-excluded nodes. The nodes kept in float are recorded in the manifest
(extra.quantization) and in the report, with the --exclude flag that reproduces them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from emu_edge.calibration import sensitivity
from emu_edge.calibration.calibrate import Calibration
from emu_edge.runtime.backends import import_onnxruntime
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.manifest import PRECISIONS, GraphSpec, ModelSpec

METHODS = ("minmax", "entropy", "percentile")
WEIGHT_ONLY_GRAPHS = ("decoder",)
# Op types static INT8 quantizes, measured on the shipped model (calibration/placement.py
# and the report): INT8 pays only where onnxruntime runs a fused integer kernel and the
# op does enough arithmetic to amortise quantizing its input. Everything else (norms,
# softmax, SiLU, the U-Net's time embedding) stays float: QDQ around them only adds
# work and error.
#   unet: Conv only. On the shipped model (calibration/placement.py, held-out samples,
#     2 threads): Conv 1.31x FP32 at 3.5% error; Conv+MatMul 1.20x, Conv+MatMul+Gemm
#     1.17x at the same error; MatMul alone 0.92x; everything 1.14x at 33% error. The
#     3x3 convolutions hold the arithmetic and run as fused QLinearConv; the attention
#     MatMuls are small and quantize activations on both sides.
#   vision_encoder: MatMul when asked for (3x smaller, 2% error). It is not quantized by
#     --precision int8/int4 (INT8_BY_DEFAULT): its GEMMs (65 tokens x 128) are too small
#     for INT8 to pay, 0.76-1.06x FP32 over 1-2 threads and batch 1-16.
#   vq_decoder, vq_encoder (Emu3): measured by benchmarks/vq_precision.py (random weights,
#     1 and 2 threads) on Emu3's VQ-VAE architecture at a quarter of its width (17M
#     parameters), 64x64 / 128x128 pixels, against FP32:
#       vq_decoder  int8 Conv 2.26x / 2.23x faster on 1 thread, 2.46x / 2.21x on 2, at PSNR
#                   34.5 / 32.4 dB (5-6% error); Conv+MatMul no better; MatMulNBits 8-bit
#                   (dynamic int8 activations, the attention projections) 0.96-1.01x; fp16
#                   0.96-1.00x (the CPU provider has no fp16 convolutions)
#       vq_encoder  int8 Conv 1.96-2.51x faster, but 56% / 67% of the codes change (a
#                   32768-entry codebook in 4 dimensions: the nearest code moves with any
#                   rounding); MatMulNBits 8-bit 0.84-0.94x, 6-7% of the codes; fp16
#                   0.93-0.97x, 1.6% / 0.7%.
#     The tiny test VQ-VAE: Conv 1.25-1.70x, the same pattern of errors. So the encoder
#     offers no int8 (its export spec lists fp32, fp16) and the decoder offers Conv.
STATIC_INT8_OPS: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("MatMul",),
    "unet": ("Conv",),
    "vq_decoder": ("Conv",),
}
# Graphs --precision int8/int4 leaves in float, and why (--graph NAME=int8 still asks where
# the graph's export spec allows int8).
NOT_INT8_BY_DEFAULT = {
    "vision_encoder": "static INT8 measured no faster than FP32 for this encoder (see STATIC_INT8_OPS)",
    "vq_encoder": "INT8 changes most image codes (see STATIC_INT8_OPS)",
    "vq_decoder": "it runs once per image, after the decoder steps that write it; INT8 would halve that one call "
                  "at about 33 dB PSNR (see STATIC_INT8_OPS)",
}
# Default --max-rel-error per precision: the worst output's mean relative error on
# calibration samples above which nodes are kept in float.
MAX_REL_ERROR = {"int8": 0.05, "int4": 0.15, "fp16": 0.01}
# onnxruntime 1.31 reads IR <= 13, the devices' onnxruntime (JetPack 6, 1.16+) IR <= 9.
MAX_IR_VERSION = 9


class QuantizeError(ValueError):
    """The request cannot be carried out; the message says why and what to do."""


@dataclass
class QuantizeSettings:
    precision: str | None = None                 # for every graph
    graphs: dict[str, str] = field(default_factory=dict)        # per graph, overrides precision
    calibration: str | Path | None = None
    method: str = "minmax"
    exclude: dict[str, list[str]] = field(default_factory=dict)  # graph -> node names kept in float
    auto_exclude: bool = True
    max_rel_error: float | None = None           # default: MAX_REL_ERROR[precision]
    max_excluded: int = 16
    block_size: int = 32
    accuracy_level: int = 4                      # MatMulNBits: 4 = int8 compute (VNNI), 0 = fp32
    symmetric: bool = True                       # MatMulNBits weights without zero points
    tensorrt: bool = False                       # static INT8 in the form TensorRT builds from
    op_types: dict[str, tuple[str, ...]] = field(default_factory=dict)  # static INT8 ops, per graph
    threads: int | None = None

    def static_ops(self, graph: str) -> tuple[str, ...]:
        return self.op_types.get(graph) or STATIC_INT8_OPS.get(graph, ("Conv", "MatMul"))


@dataclass
class GraphResult:
    name: str
    source_precision: str
    precision: str
    method: str = "copied"
    excluded: list[str] = field(default_factory=list)
    auto_excluded: list[str] = field(default_factory=list)
    sensitive: list[tuple[str, float]] = field(default_factory=list)   # most error-adding nodes
    selection_error: dict | None = None          # on calibration samples, after exclusions

    def to_dict(self) -> dict:
        out = {"source_precision": self.source_precision, "precision": self.precision, "method": self.method}
        if self.excluded:
            out["excluded_nodes"] = self.excluded
        if self.auto_excluded:
            out["auto_excluded_nodes"] = self.auto_excluded
        if self.sensitive:
            out["most_sensitive_nodes"] = [{"node": n, "added_rel_error": round(e, 6)} for n, e in self.sensitive]
        if self.selection_error:
            out["calibration_error"] = self.selection_error
        return out


# -- the plan ------------------------------------------------------------------------------


def parse_graph_precisions(text: str | None) -> dict[str, str]:
    """"decoder=int4,unet=int8" -> {"decoder": "int4", "unet": "int8"}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, precision = part.partition("=")
        if not sep or not name.strip() or not precision.strip():
            raise QuantizeError(f"--graph takes name=precision pairs separated by commas "
                                f"(decoder=int4,unet=int8), got {part!r}")
        out[name.strip()] = precision.strip()
    return out


def parse_exclude(text: str | None) -> dict[str, list[str]]:
    """"unet:node_a,node_b;decoder:node_c" -> {"unet": [...], "decoder": [...]}."""
    out: dict[str, list[str]] = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        graph, sep, nodes = part.partition(":")
        if not sep:
            raise QuantizeError(f"--exclude takes graph:node,node;graph:node (as the report suggests), got {part!r}")
        out.setdefault(graph.strip(), []).extend(n.strip() for n in nodes.split(",") if n.strip())
    return out


def plan(manifest, settings: QuantizeSettings) -> dict[str, str]:
    """Target precision of every graph; raises QuantizeError listing the valid choices."""
    if settings.precision is None and not settings.graphs:
        raise QuantizeError(f"say what to quantize: --precision {' | '.join(PRECISIONS[1:])} and/or "
                            "--graph name=precision,...")
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise QuantizeError(f"unknown precision {settings.precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    if settings.method not in METHODS:
        raise QuantizeError(f"unknown calibration method {settings.method!r}; valid methods: {', '.join(METHODS)}")
    graphs = manifest.graphs
    for name, precision in settings.graphs.items():
        if name not in graphs:
            raise QuantizeError(f"unknown graph {name!r}; this bundle's graphs are: {', '.join(graphs)}")
        # What a graph may become is declared by its export spec, in the manifest.
        if precision not in graphs[name].precisions:
            raise QuantizeError(f"{name} cannot be {precision!r}; valid precisions for {name}: "
                                f"{', '.join(graphs[name].precisions)}")
    for name in settings.exclude:
        if name not in graphs:
            raise QuantizeError(f"--exclude names unknown graph {name!r}; this bundle's graphs are: {', '.join(graphs)}")
    targets, asked = {}, {}
    for name, spec in graphs.items():
        if name in settings.graphs:
            # Naming a graph's current precision keeps it.
            targets[name] = settings.graphs[name]
            asked[name] = targets[name] != spec.precision
        elif settings.precision is not None:
            targets[name] = _default_precision(name, spec.precisions, settings.precision)
            asked[name] = targets[name] != "fp32"
        else:
            targets[name], asked[name] = spec.precision, False
    for name, spec in graphs.items():
        if spec.precision != "fp32" and asked[name]:
            raise QuantizeError(
                f"{name} is already {spec.precision} in this bundle and is not quantized again: quantize the fp32 "
                "bundle it came from, or name only the graphs to change with --graph (the others keep their "
                "precision)")
    return targets


def _default_precision(graph: str, allowed: list[str], precision: str) -> str:
    if precision in ("int8", "int4") and graph in NOT_INT8_BY_DEFAULT:
        return "fp32"
    if precision in allowed:
        return precision
    if precision == "int4" and "int8" in allowed:
        return "int8"   # no 4-bit kernels for convolutions and activations
    return "fp32"


# -- one graph at a time -------------------------------------------------------------------


@contextlib.contextmanager
def _contained():
    """onnxruntime.quantization logs every node at INFO and advises pre-processing on the
    root logger; our own log says what was done. Its symbolic shape inference also drops
    sym_shape_infer_temp.onnx and its external-data file into the working directory when it
    cannot infer every shape, so the calls run from a scratch directory (absolute paths only)."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="emu-edge-quant-cwd-") as scratch, contextlib.chdir(scratch):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fix_versions(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Quantizers may restamp the IR version; graphs stay readable by the devices' onnxruntime."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = max(source.ir_version, min(model.ir_version, MAX_IR_VERSION))
    return model


def _check_io(name: str, source: onnx.ModelProto, model: onnx.ModelProto, kv_fp16: bool = False) -> None:
    def io(m):
        return [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]

    want = [(n, onnx.TensorProto.FLOAT16 if kv_fp16 and _is_kv(n) else t) for n, t in io(source)]
    if io(model) != want:
        raise QuantizeError(f"quantizing {name} changed its inputs or outputs ({io(model)} instead of {want}); "
                            "this onnxruntime.quantization version is not supported, please report it")


def _is_kv(name: str) -> bool:
    return name.startswith("past_key_values.") or name.startswith("present.")


def weight_only(model: onnx.ModelProto, bits: int, settings: QuantizeSettings, exclude: list[str],
                heads: list[str] = ()) -> onnx.ModelProto:
    """MatMul with a constant weight -> MatMulNBits (block-wise, `bits` per weight); the
    `heads` get 8 bits when the rest gets 4, the `exclude`d nodes stay float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def run(m: onnx.ModelProto, b: int, skip: list[str]) -> onnx.ModelProto:
        quantizer = MatMulNBitsQuantizer(m, bits=b, block_size=settings.block_size, is_symmetric=settings.symmetric,
                                         accuracy_level=settings.accuracy_level, nodes_to_exclude=skip,
                                         op_types_to_quantize=("MatMul",))
        with _contained():
            quantizer.process()
        return quantizer.model.model

    heads = [h for h in heads if h not in exclude] if bits == 4 else []
    kept_float = input_projections(model)
    out = run(copy.deepcopy(model), bits, list(exclude) + heads + kept_float)
    if heads:
        # The second pass gives the heads 8 bits; every other MatMul left is one kept float.
        others = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in heads]
        out = run(out, 8, others)
    out = _fix_versions(out, model)
    # At 8 bits the table stays float: an 8-bit one needs onnxruntime 1.23 (the `bits`
    # attribute) and cost the shipped Emu3-style model's int8 its image-token target.
    return quantize_token_table(out, settings.block_size, exclude) if bits == 4 else out


TABLE_ROWS_PER_CHUNK = 8192   # rows quantized at a time: an 8B Emu3's table is 3 GB in float32


def _pack4(values: np.ndarray) -> bytes:
    """4-bit values, flattened, two per byte, low nibble first (ONNX's UINT4 layout)."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def block_quantize(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block-wise quantization along the rows of a [rows, width] table:
    (codes uint8 [rows, width], scales float32 [rows, width / block_size], zero points uint8
    [rows, width / block_size]), row r's values being (codes - zero point) * scale."""
    levels = 2 ** bits - 1
    rows, width = table.shape
    codes = np.empty((rows, width), np.uint8)
    scales = np.empty((rows, width // block_size), np.float32)
    zeros = np.empty((rows, width // block_size), np.uint8)
    for lo in range(0, rows, TABLE_ROWS_PER_CHUNK):
        blocks = table[lo:lo + TABLE_ROWS_PER_CHUNK].astype(np.float32).reshape(-1, width // block_size, block_size)
        # The range holds 0, so that the zero point is a code.
        low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = (high - low) / levels
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-low / scale), 0, levels)
        q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, levels)
        codes[lo:lo + len(blocks)] = q.reshape(len(blocks), width)
        scales[lo:lo + len(blocks)], zeros[lo:lo + len(blocks)] = scale, zero
    return codes, scales, zeros


def quantize_token_table(model: onnx.ModelProto, block_size: int, exclude: list[str]) -> onnx.ModelProto:
    """A Gather from a float [rows, width] constant read by nothing else (the decoder's
    token table) -> com.microsoft.GatherBlockQuantized: 4-bit UINT4 codes (IR 10), a float32
    scale and a zero point per `block_size` values of a row. A text step dequantizes its
    own row; the table is as big as an output head (3 GB of an 8B Emu3's int4 weights in
    float32) and shrinks 6.2x at block 32."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    for i, node in enumerate(model.graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or node.name in exclude or readers[table.name] != 1 or axis != 0
                or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or table.dims[1] % block_size):
            continue
        codes, scales, zeros = block_quantize(numpy_helper.to_array(table), 4, block_size)
        name = table.name
        tensors = [onnx.helper.make_tensor(f"{name}_q4", onnx.TensorProto.UINT4, codes.shape, _pack4(codes), raw=True),
                   numpy_helper.from_array(scales, f"{name}_scales"),
                   onnx.helper.make_tensor(f"{name}_zero_points", onnx.TensorProto.UINT4, zeros.shape, _pack4(zeros),
                                           raw=True)]
        model.graph.initializer.remove(table)
        model.graph.initializer.extend(tensors)
        model.graph.node.remove(node)
        model.graph.node.insert(i, onnx.helper.make_node(
            "GatherBlockQuantized", [tensors[0].name, node.input[1], tensors[1].name, tensors[2].name],
            list(node.output), name=f"{node.name}_Q4", domain="com.microsoft", gather_axis=0, quantize_axis=1,
            block_size=block_size))
        model.ir_version = max(model.ir_version, 10)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over recorded samples."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self.samples = samples
        self.position = 0

    def get_next(self):
        if self.position >= len(self.samples):
            return None
        self.position += 1
        return self.samples[self.position - 1]

    def rewind(self):
        self.position = 0

    def __len__(self):
        return len(self.samples)

    def set_range(self, start_index: int, end_index: int):
        self.samples = self.samples[start_index:end_index]
        self.position = 0


def static_int8(source_path: Path, source: onnx.ModelProto, graph: str, samples: list[dict[str, np.ndarray]],
                settings: QuantizeSettings, exclude: list[str], ranges_cache: Path) -> onnx.ModelProto:
    """Static QDQ INT8 of the graph's STATIC_INT8_OPS. Ranges are computed once per graph
    and cached, so re-quantizing with more nodes excluded costs no new calibration."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if settings.tensorrt:
        # TensorRT's explicit quantization takes signed INT8 with zero points of 0, and
        # biases in float (it has no INT32 dequantization).
        activation = QuantType.QInt8
        options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    else:
        # u8 activations x s8 weights: the VNNI / dot-product kernels' native pairing.
        activation, options = QuantType.QUInt8, {"WeightSymmetric": True}
    # Not CalibMaxIntermediateOutputs: onnxruntime 1.31's MinMax calibrator drops the
    # outputs collected so far each time that many accumulate, instead of merging them.
    with tempfile.TemporaryDirectory(prefix="emu-edge-quant-") as tmp:
        out = Path(tmp) / f"{graph}.int8.onnx"
        source_file, ranges_file = str(Path(source_path).resolve()), str(Path(ranges_cache).resolve())
        with _contained():
            quantize_static(source_file, str(out), Reader(samples), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(settings.static_ops(graph)),
                            per_channel=True, reduce_range=False, activation_type=activation,
                            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                            calibrate_method=methods[settings.method], extra_options=options,
                            calibration_cache_path=ranges_file)
        model = onnx.load(str(out))
    return _fix_versions(model, source)


def to_fp16(model: onnx.ModelProto, graph: str, exclude: list[str]) -> onnx.ModelProto:
    """float16 weights and compute. I/O stays float32 (the runtime feeds numpy float32),
    except the decoder's KV buffers: float16 there halves the cache and its traffic."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = [v.name for v in list(model.graph.input) + list(model.graph.output)
            if not (graph in WEIGHT_ONLY_GRAPHS and _is_kv(v.name))]
    with _contained():
        converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=keep,
                                             node_block_list=list(exclude) or None)
    # The converter appends the casts of kept inputs after their consumers.
    _sort_nodes(converted.graph)
    return _fix_versions(converted, model)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put nodes in an order where every input is produced before it is used."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        left = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise QuantizeError(f"graph {graph.name!r} has a cycle or an unproduced input at node {left[0].name!r}")
        pending = left
    graph.ClearField("node")
    graph.node.extend(ordered)


# -- one graph, with the error loop ---------------------------------------------------------


def input_projections(model: onnx.ModelProto) -> list[str]:
    """MatMuls that read a graph input directly: the decoder's project_up of Emu2's visual
    embeddings. They stay float: they run on image positions only (nothing per text
    token), and their error would enter every one."""
    inputs = {i.name for i in model.graph.input}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in inputs]


def _quantizable_nodes(model: onnx.ModelProto, graph: str, precision: str,
                       settings: QuantizeSettings) -> list[onnx.NodeProto]:
    init = {i.name for i in model.graph.initializer}
    if precision in ("int8", "int4") and graph in WEIGHT_ONLY_GRAPHS:
        skip = set(input_projections(model))
        return [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in init
                and n.name not in skip]
    if precision == "int8":
        ops = settings.static_ops(graph)
        return [n for n in model.graph.node if n.op_type in ops]
    return []


def _describe(name: str, precision: str, settings: QuantizeSettings) -> str:
    if precision == "fp16":
        return "fp16 (float16 weights and compute)"
    if name in WEIGHT_ONLY_GRAPHS:
        return (f"weight-only {precision} MatMulNBits, block {settings.block_size}, "
                f"{'symmetric' if settings.symmetric else 'asymmetric'}, accuracy_level {settings.accuracy_level}"
                + (f"; token table 4-bit GatherBlockQuantized, asymmetric, block {settings.block_size}"
                   if precision == "int4" else "; token table float32"))
    ops = ",".join(settings.static_ops(name))
    return (f"static int8 QDQ on {ops}, {settings.method} calibration, per-channel weights, "
            + ("symmetric s8 (TensorRT)" if settings.tensorrt else "u8 activations"))


def basic_optimized(source_path: Path, out: Path) -> Path:
    """The graph after onnxruntime's basic (standard-op) optimizations: constant folding and
    common subexpressions merged. Quantizing before this hurts twice: the exported vision
    encoder computes its trunk once per output and onnxruntime merges the copies at load
    time, but not once Q/DQ pairs differ between them (measured: 2x the work); and shape
    arithmetic folded now is not wrapped in Q/DQ."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(source_path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out))
    # The saved graph imports every domain onnxruntime knows; keep those its nodes use.
    used = {n.domain or "" for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, str(out))
    return out


def output_heads(model: onnx.ModelProto, candidates: list[onnx.NodeProto]) -> list[str]:
    """The candidates that write a graph output, directly or through an Identity or a bias
    Add: the U-Net's last Conv, the decoder's lm_head and regression head. Their error
    lands in the output unattenuated, so they get more bits: static graphs keep them in
    float (QDQ would also round the output itself to 8 bits), 4-bit decoders give them 8.
    On the shipped decoder at int4, 8-bit heads take the logits' error on held-out
    samples from 2.6% to 1.0% and the regressed embeddings' from 9.1% to 3.6%, for
    0.1 MB."""
    outputs = {o.name for o in model.graph.output}
    constants = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def reaches_output(tensor: str) -> bool:
        if tensor in outputs:
            return True
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return False
        user = users[0]
        passes = user.op_type == "Identity" or (user.op_type == "Add" and any(i in constants for i in user.input))
        return passes and reaches_output(user.output[0])

    return [n.name for n in candidates if reaches_output(n.output[0])]


def quantize_graph(name: str, source_path: Path, precision: str, settings: QuantizeSettings,
                   calibration: Calibration | None, workdir: Path, log=print) -> tuple[onnx.ModelProto, GraphResult]:
    static = precision == "int8" and name not in WEIGHT_ONLY_GRAPHS
    original = source_path
    if static:
        source_path = basic_optimized(source_path, workdir / f"{name}.basic.onnx")
    source = onnx.load(str(source_path))
    result = GraphResult(name=name, source_precision="fp32", precision=precision,
                         method=_describe(name, precision, settings))
    user_exclude = list(settings.exclude.get(name, []))
    known = {n.name for n in source.graph.node}
    unknown = [n for n in user_exclude if n not in known]
    if unknown:
        raise QuantizeError(f"--exclude {name}:{','.join(unknown)}: {name} has no node(s) named so "
                            f"(node names are in the report's most_sensitive_nodes)")
    candidates = _quantizable_nodes(source, name, precision, settings)
    heads = output_heads(source, candidates)
    if static:
        user_exclude += [n for n in heads if n not in user_exclude]
    samples: list = []
    if calibration is not None and name in calibration.graphs:
        samples = calibration.samples(name, heldout=False) or calibration.samples(name)
    # A few dozen samples rank nodes as well as all of them, at a fraction of the time.
    check_samples = samples[:: max(1, len(samples) // 24)]

    def make(exclude: list[str]) -> onnx.ModelProto:
        if precision == "fp16":
            return to_fp16(source, name, exclude)
        if name in WEIGHT_ONLY_GRAPHS:
            return weight_only(source, 4 if precision == "int4" else 8, settings, exclude, heads)
        return static_int8(source_path, source, name, samples, settings, exclude, workdir / f"{name}.ranges.json")

    exclude = list(user_exclude)
    model = make(exclude)
    if check_samples:
        fp32_sess = sensitivity.session(str(original), settings.threads)

        def error_of(m):
            return sensitivity.worst(sensitivity.graph_error(fp32_sess, sensitivity.session(m, settings.threads),
                                                             check_samples))

        error = error_of(model)
        limit = settings.max_rel_error if settings.max_rel_error is not None else MAX_REL_ERROR[precision]
        left = [n for n in candidates if n.name not in exclude]
        ranked = sensitivity.node_errors(source, model, left, check_samples, settings.threads) if left else []
        result.sensitive = ranked[:8]
        if settings.auto_exclude and error.rel_error > limit and ranked:
            log(f"  {name}: relative error {error.rel_error:.4f} > {limit}; keeping the most error-adding nodes in float")
            for count in _exclusion_steps(min(settings.max_excluded, len(ranked))):
                exclude = user_exclude + [n for n, _ in ranked[:count]]
                model = make(exclude)
                error = error_of(model)
                log(f"    {count} node(s) in float: relative error {error.rel_error:.4f}")
                if error.rel_error <= limit:
                    break
            result.auto_excluded = exclude[len(user_exclude):]
        result.selection_error = error.to_dict()
    result.excluded = exclude
    _check_io(name, onnx.load(str(original)), model, kv_fp16=(precision == "fp16" and name in WEIGHT_ONLY_GRAPHS))
    return model, result


def _exclusion_steps(limit: int) -> list[int]:
    steps, k = [], 1
    while k < limit:
        steps.append(k)
        k *= 2
    return steps + [limit]


# -- the bundle ----------------------------------------------------------------------------


def _copy_graph(writer, bundle: Bundle, name: str) -> GraphSpec:
    """The graph's files byte for byte, and its manifest entry unchanged."""
    spec = copy.deepcopy(bundle.manifest.graphs[name])
    for file in [spec.file] + [e["file"] for e in spec.external_data]:
        shutil.copyfile(bundle.path / file, writer.tmp / file)
    writer.graphs[name] = spec
    return spec


def quantize_bundle(bundle_path: str | Path, out: str | Path, settings: QuantizeSettings, overwrite: bool = False,
                    log=print) -> tuple[Path, dict[str, GraphResult]]:
    from emu_edge.export.bundle_writer import BundleWriter

    bundle = Bundle.open(bundle_path)
    targets = plan(bundle.manifest, settings)
    graphs = bundle.manifest.graphs
    static = [n for n, p in targets.items() if p == "int8" and n not in WEIGHT_ONLY_GRAPHS
              and graphs[n].precision == "fp32"]
    calibration = None
    if settings.calibration is not None:
        calibration = Calibration.load(settings.calibration)
        checked = [n for n, p in targets.items() if p != graphs[n].precision and n in calibration.graphs]
        calibration.check(bundle.manifest, sorted(set(static) | set(checked)))
    elif static:
        raise QuantizeError(
            f"static INT8 of {', '.join(static)} needs --calibration CALIB (record one with emu-edge calibrate "
            f"{bundle.path} --data DIR --out CALIB, DIR from emu-edge data --split val --n 64 --out DIR), or keep "
            f"them in float with --graph {','.join(f'{n}=fp32' for n in static)}")
    results: dict[str, GraphResult] = {}
    model_spec = copy.deepcopy(bundle.manifest.model)
    with tempfile.TemporaryDirectory(prefix="emu-edge-quantize-") as workdir, \
            BundleWriter(out, overwrite=overwrite, log=log, sources=[bundle.path]) as writer:
        log(f"quantizing {bundle.path} into {writer.out}")
        for name, spec in graphs.items():
            target = targets[name]
            if target == spec.precision:
                _copy_graph(writer, bundle, name)
                results[name] = GraphResult(name=name, source_precision=spec.precision, precision=target)
                why = NOT_INT8_BY_DEFAULT.get(name) if settings.precision in ("int8", "int4") and \
                    name not in settings.graphs else None
                log(f"  {spec.file}: {spec.precision}, copied" + (f" ({why})" if why else ""))
                continue
            model, result = quantize_graph(name, bundle.graph_path(name), target, settings, calibration,
                                           Path(workdir), log)
            extra = dict(spec.extra)
            extra["quantization"] = {k: v for k, v in result.to_dict().items() if k != "calibration_error"}
            new = writer.add_graph(name, model, precision=target, profiles=spec.profiles,
                                   dynamic_axes=spec.dynamic_axes, extra=extra, role=spec.role, names=spec.names,
                                   precisions=spec.precisions)
            if target == "fp16" and name in WEIGHT_ONLY_GRAPHS:
                model_spec.kv.dtype = "float16"
            results[name] = result
        writer.write_tokenizer(bundle.path / bundle.manifest.tokenizer)
        model_spec.source = dict(model_spec.source, quantized_from=str(Path(bundle.path).resolve()),
                                 precisions={n: targets[n] for n in graphs})
        path = writer.finish(ModelSpec.from_dict(model_spec.to_dict(), "model"))
    return path, results

