"""How far a quantized graph is from its FP32 source, in total and node by node.

    graph_error(fp32, variant, samples)   -> per output: mean cosine, min cosine, relative error
    node_errors(fp32, variant, nodes, samples) -> per quantized node: the relative error it adds

Both graphs run on the same recorded inputs with onnxruntime's CPU provider. A node's
added error is the relative error of its output minus that of its activation input, both
against the FP32 graph: errors accumulate along the graph, and the difference isolates
what this node's own quantization contributes. Quantizers keep the names of the tensors
that compute nodes produce (QDQ wraps them, MatMulNBits writes to the same output), so
the same names address the same values in both graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from emu_edge.runtime.backends import import_onnxruntime

# The decoder's KV outputs are its inputs again; their error shows up in the logits.
SKIPPED_OUTPUT_PREFIX = "present."


@dataclass
class OutputError:
    cosine: float        # mean over samples of the cosine similarity of the flattened outputs
    cosine_min: float
    rel_error: float     # mean over samples of ||variant - fp32|| / ||fp32||

    def to_dict(self) -> dict:
        return {"cosine": round(self.cosine, 6), "cosine_min": round(self.cosine_min, 6),
                "rel_error": round(self.rel_error, 6)}


def session(model: onnx.ModelProto | str, threads: int | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    # Several graphs are compared side by side: idle worker threads of one session must
    # not spin on the cores the next one is being timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def compared_outputs(sess) -> list[str]:
    return [o.name for o in sess.get_outputs() if not o.name.startswith(SKIPPED_OUTPUT_PREFIX)]


def _cast_feeds(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the dtypes the session declares (an fp16 decoder takes fp16 KV buffers)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for name, value in feeds.items():
        if types.get(name) == "tensor(float16)" and value.dtype != np.float16:
            value = value.astype(np.float16)
        elif types.get(name) == "tensor(float)" and value.dtype != np.float32:
            value = value.astype(np.float32)
        out[name] = value
    return out


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = 1.0 if na == 0 and nb == 0 else float(a @ b / max(na * nb, 1e-300))
    rel = float(np.linalg.norm(a - b) / max(na, 1e-12))
    return cosine, rel


def graph_error(fp32_sess, variant_sess, samples: list[dict[str, np.ndarray]]) -> dict[str, OutputError]:
    if not samples:
        raise ValueError("no samples to compare the graphs on")
    names = compared_outputs(fp32_sess)
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for feeds in samples:
        want = fp32_sess.run(names, _cast_feeds(fp32_sess, feeds))
        got = variant_sess.run(names, _cast_feeds(variant_sess, feeds))
        for name, a, b in zip(names, want, got):
            per[name].append(_errors(a, b))
    out = {}
    for name, pairs in per.items():
        cos = np.array([p[0] for p in pairs])
        rel = np.array([p[1] for p in pairs])
        out[name] = OutputError(cosine=float(cos.mean()), cosine_min=float(cos.min()), rel_error=float(rel.mean()))
    return out


def worst(errors: dict[str, OutputError]) -> OutputError:
    """The graph's figure: its worst output."""
    return OutputError(cosine=min(e.cosine for e in errors.values()),
                       cosine_min=min(e.cosine_min for e in errors.values()),
                       rel_error=max(e.rel_error for e in errors.values()))


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of a graph (only those can be compared as errors)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def node_errors(fp32_model: onnx.ModelProto, variant_model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                samples: list[dict[str, np.ndarray]], threads: int | None = None) -> list[tuple[str, float]]:
    """(node name, added relative error) for each of `nodes` (FP32 graph nodes that were
    quantized), largest first."""
    produced = {o for n in variant_model.graph.node for o in n.output}
    graph_inputs = {i.name for i in fp32_model.graph.input}
    floats = _float_tensors(fp32_model)
    pairs = []
    for node in nodes:
        out, inp = node.output[0], node.input[0]
        if out in produced and out in floats and inp in floats and (inp in produced or inp in graph_inputs):
            pairs.append((node.name, inp, out))
    tensors = sorted({t for _, i, o in pairs for t in (i, o) if t not in graph_inputs})
    fp32_sess = session(_with_outputs(fp32_model, tensors), threads)
    variant_sess = session(_with_outputs(variant_model, tensors), threads)
    sums = {t: 0.0 for t in tensors}
    for feeds in samples:
        want = fp32_sess.run(tensors, _cast_feeds(fp32_sess, feeds))
        got = variant_sess.run(tensors, _cast_feeds(variant_sess, feeds))
        for t, a, b in zip(tensors, want, got):
            sums[t] += _errors(a, b)[1]
    err = {t: s / len(samples) for t, s in sums.items()}
    ranked = [(name, err[o] - err.get(i, 0.0)) for name, i, o in pairs]
    return sorted(ranked, key=lambda r: -r[1])
