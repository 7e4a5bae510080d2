"""The decoder graph, built op by op from one canonical description and its weights.

`DecoderDescription` is what the builder reads: sizes, norm, activation, rotary settings,
which projections carry biases. Weights come by canonical name ("layers.{i}.attn.q.weight";
see CANONICAL_WEIGHTS); export/adapters.py maps each source layout (Llama, Qwen2, Emu3's
text model) onto both, so the builder never sees a transformers config or an HF name.

One builder, two attention variants behind one contract (DESIGN.md, "The decoder's
KV-cache contract"):

    inputs   input_ids                 int64   [batch, sequence]
             image_embeds              float32 [image_tokens, visual_dim]  (with project_up)
             past_key_values.{i}.key   float32 [batch, kv_heads, max_length, head_dim]
             past_key_values.{i}.value (same; allocated once by the runtime)
             seqlens_k                 int32   [batch]  tokens in each row AFTER this call, - 1
             total_sequence_length     int32   []       max over rows of seqlens_k + 1
    outputs  logits                    float32 [batch, vocab]       last position of each row
             regressed                 float32 [batch, visual_dim]  (with project_down)
             present.{i}.key / .value  the past buffers, written in place

The token embedding is the graph's first node, so a decode step is one graph run from
token ids (as onnxruntime-genai's graphs are) and the table is stored once. Emu2's visual
embeddings enter through the same call: the positions where input_ids holds the image
token are replaced, in row-major order, by project_up(image_embeds); a multimodal prompt
and each step of the regression loop (the last regressed embedding fed back) are one
run too. Text-only calls feed image_embeds with 0 rows: onnxruntime accepts a zero-sized
dimension and NonZero/ScatterND handle an empty set of positions. A count that differs
from the number of image tokens fails in ScatterND instead of silently misplacing
embeddings.

The lengths follow onnxruntime's GroupQueryAttention: each row of the cache holds its
tokens from position 0 with no padding inside (a "ragged" batch), so row b's new tokens
land at positions past_b .. past_b + S - 1, where past_b = max(0, seqlens_k[b] + 1 - S),
and their rotary positions are the same numbers. A first prompt of several rows of
different lengths is right-padded in `input_ids`; seqlens_k says where each row ends
and the logits are taken there. The lengths are the attention mask, so no mask input is
needed, and a batched prompt sees exactly the positions it would see alone.

- "gqa": com.microsoft GroupQueryAttention with rotary inside (cos/sin caches as
  initializers) and packed QKV. Bind the same OrtValue to past_key_values.{i}.* and
  present.{i}.*: the kernel then writes only the new rows (past_present_share_buffer).
  Its CPU kernel needs head_dim % 16 == 0. Since this variant is onnxruntime's alone, it
  also uses its fused residual + RMSNorm (com.microsoft SkipSimplifiedLayerNormalization,
  whose optional output carries the residual sum on): a decode step is dispatch-bound
  enough that the Add nodes onnxruntime does not fuse by itself cost measurable time.
- "standard": standard ONNX ops only, for TensorRT and as the fallback. ScatterND writes
  the new K/V rows into the buffer; onnxruntime's ScatterND skips its full copy when its
  output and input are the same buffer, so with the same binding the write is O(new
  tokens). Attention then reads the first total_sequence_length rows through a Slice,
  which onnxruntime materialises: the step costs a copy of the live K/V on top of reading
  it (O(context), never O(max_length)). Masked positions get a probability of exactly 0,
  so the buffers must hold finite values where a row has not written yet: the runtime
  zero-fills them once when it allocates them.

Both variants run on onnxruntime's CPU provider as checked against PyTorch: "standard"
from onnxruntime 1.16, "gqa" from 1.20 (1.20.1 once converted to float16; see
bundle_writer.MIN_ONNXRUNTIME_FOR_OPS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from emu_edge.export.target import IR_VERSION, OPSET

MS_DOMAIN = "com.microsoft"
ATTENTION_VARIANTS = ("gqa", "standard")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class DecoderExportError(ValueError):
    """The model cannot be built into the decoder graph (unsupported setting)."""


# ---------------------------------------------------------------------------------------
# A small graph builder: names, constants and initializers without the boilerplate.


class GraphBuilder:
    """spill: where large initializers go as they are made (BundleWriter.spill(name), a
    DataFile): the graph in memory then holds small protos that point into that file, and
    an 8B decoder is never whole in memory. None: every initializer stays in the proto."""

    def __init__(self, name: str, spill=None):
        self.name = name
        self.spill = spill
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counter = 0
        self._constants: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        node_name = name or self._fresh(op_type)
        if isinstance(outputs, int):
            out_names = [f"{node_name}/out{i}" for i in range(outputs)]
        else:
            out_names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), out_names, name=node_name,
                                           domain=domain or None, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    def initializer(self, name: str, array: np.ndarray) -> str:
        """array in any layout (a transposed view is fine): its bytes are written in C order."""
        array = np.asarray(array)
        if self.spill is not None and array.nbytes >= self.spill.min_bytes:
            self.initializers.append(self.spill.tensor(name, array))
        else:
            # np.ascontiguousarray would turn a 0-d array into shape [1]
            self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.initializer(self._fresh("const"), array)
        return self._constants[key]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, uses_ms_domain: bool = False, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="emu-edge", doc_string=doc)
        # onnx 1.23 stamps IR 14, which the onnxruntime versions we target refuse to load.
        model.ir_version = IR_VERSION
        return model

    # -- composite helpers used by both graphs ---------------------------------------------

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """y = x @ W.T + b with W [out, in] as stored by torch.nn.Linear."""
        # A transposed view: the initializer copies it once (in blocks when it spills).
        w = self.initializer(f"{name}.weight_t", np.asarray(weight, dtype=np.float32).T)
        y = self.op("MatMul", x, w, name=f"{name}/MatMul")
        if bias is not None:
            b = self.initializer(f"{name}.bias", bias.astype(np.float32))
            y = self.op("Add", y, b, name=f"{name}/Add")
        return y

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        # The Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the pattern onnxruntime fuses into
        # SimplifiedLayerNormalization; it equals LlamaRMSNorm in float32.
        sq = self.op("Pow", x, self.const(2.0, np.float32), name=f"{name}/Pow")
        var = self.op("ReduceMean", sq, self.const([-1]), keepdims=1, name=f"{name}/ReduceMean")
        std = self.op("Sqrt", self.op("Add", var, self.const(eps, np.float32), name=f"{name}/Add"),
                      name=f"{name}/Sqrt")
        normed = self.op("Div", x, std, name=f"{name}/Div")
        w = self.initializer(f"{name}.weight", weight.astype(np.float32))
        return self.op("Mul", normed, w, name=f"{name}/Mul")

    def skip_rms_norm(self, x: str, skip: str, weight: np.ndarray, eps: float, name: str,
                      keep_sum: bool = True) -> tuple[str, str | None]:
        """(rms_norm(x + skip), x + skip) in one com.microsoft SkipSimplifiedLayerNormalization:
        the residual add and the norm that reads it are one kernel instead of two passes."""
        w = self.initializer(f"{name}.weight", weight.astype(np.float32))
        outputs = [f"{name}/out", "", "", f"{name}/sum"] if keep_sum else [f"{name}/out"]
        out = self.op("SkipSimplifiedLayerNormalization", x, skip, w, outputs=outputs, name=name,
                      domain=MS_DOMAIN, epsilon=eps)
        return (out[0], out[3]) if keep_sum else (out, None)


# ---------------------------------------------------------------------------------------
# The canonical decoder.

# Per-layer names carry {i}; biases are read only where the description says they exist.
CANONICAL_WEIGHTS = (
    "embed.weight", "final_norm.weight", "lm_head.weight",
    "layers.{i}.input_norm.weight", "layers.{i}.post_attention_norm.weight",
    *(f"layers.{{i}}.attn.{p}.{k}" for p in "qkvo" for k in ("weight", "bias")),
    *(f"layers.{{i}}.mlp.{p}.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")),
)


@dataclass(frozen=True)
class DecoderDescription:
    """A pre-norm decoder as the builder makes it (Llama's block; adapters fill it in)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    norm: str = "rms"
    activation: str = "silu"
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # llama3: factor, low/high_freq_factor, ...
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    embedding_scale: float = 1.0
    max_position_embeddings: int | None = None

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_parameters(self) -> dict:
        return {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_scaling}

    def check(self) -> DecoderDescription:
        """Raise DecoderExportError for anything the builder does not make."""
        if self.activation != "silu":
            raise DecoderExportError(f"hidden_act {self.activation!r} is not supported; Llama-family decoders use 'silu'")
        if self.norm != "rms":
            raise DecoderExportError(f"norm {self.norm!r} is not supported; the decoder builder makes RMSNorm")
        if self.qk_norm:
            raise DecoderExportError("this model normalises queries and keys per head (q/k-norm), which the "
                                     "decoder builder does not do yet")
        if self.num_heads % self.num_kv_heads:
            raise DecoderExportError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                                     f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise DecoderExportError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise DecoderExportError("partial_rotary_factor != 1 is not supported")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise DecoderExportError(
                f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        return self


def rope_inv_freq(params: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], computed in float32 as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(params["rope_theta"]) ** exponents)).astype(np.float32)
    if params["rope_type"] == "llama3":
        # Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by `factor`,
        # short ones kept, and the band in between interpolated smoothly.
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(params: dict, head_dim: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_length, head_dim / 2] for positions 0 .. max_length - 1."""
    inv_freq = rope_inv_freq(params, head_dim)
    freqs = np.arange(max_length, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def resolve_attention(attention: str, head_dim: int) -> str:
    """"auto" picks GroupQueryAttention where its CPU kernel runs (head_dim % 16 == 0)."""
    if attention == "auto":
        return "gqa" if head_dim % 16 == 0 else "standard"
    if attention not in ATTENTION_VARIANTS:
        raise DecoderExportError(f"attention must be 'auto', 'gqa' or 'standard', got {attention!r}")
    if attention == "gqa" and head_dim % 16:
        raise DecoderExportError(
            f"attention='gqa' needs head_dim % 16 == 0 (onnxruntime's GroupQueryAttention with "
            f"rotary); head_dim is {head_dim}: use attention='standard' or 'auto'")
    return attention


# ---------------------------------------------------------------------------------------
# The graph.


def build_decoder(desc: DecoderDescription, weights, attention: str, max_length: int,
                  project_down: tuple[np.ndarray, np.ndarray] | None = None,
                  project_up: tuple[np.ndarray, np.ndarray] | None = None, image_token_id: int | None = None,
                  spill=None) -> onnx.ModelProto:
    """The KV-cached decoder graph. weights: canonical name -> array (a dict, or an
    adapter's lazy reader: each tensor is read when its layer is built). project_up and
    image_token_id (together): visual embeddings spliced in at the image token's positions;
    project_down: the regression head. spill: see GraphBuilder; with one, at most a tensor
    or two are in memory at a time."""
    if (project_up is None) != (image_token_id is None):
        raise ValueError("project_up and image_token_id go together: give both or neither")
    dims = desc.check()
    attention = resolve_attention(attention, dims.head_dim)
    if max_length < 1:
        raise DecoderExportError(f"max_length must be >= 1, got {max_length}")
    cos_table, sin_table = rope_tables(desc.rope_parameters, dims.head_dim, max_length)
    w = _WeightReader(weights)

    g = GraphBuilder("decoder", spill)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    x = _embed(g, dims, w, ids, image_token_id, project_up)
    pasts = []
    for i in range(dims.num_layers):
        kv_shape = ["batch", dims.num_kv_heads, "max_length", dims.head_dim]
        pasts.append((g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, kv_shape),
                      g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, kv_shape)))
    seqlens_k = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total_len = g.input("total_sequence_length", TensorProto.INT32, [])
    cos = g.initializer("rope.cos", cos_table)
    sin = g.initializer("rope.sin", sin_table)

    lengths = None
    if attention == "standard":
        lengths = _Lengths(g, ids, seqlens_k, total_len, dims)
        lengths.add_positions(cos, sin)
    # "gqa" runs on onnxruntime only, so it may fuse: each residual add goes into the norm
    # that reads it, and gate/up share one MatMul. "standard" stays plain ONNX ops.
    fused = attention == "gqa"
    eps = dims.rms_norm_eps

    pending = None  # the "gqa" MLP output not yet added to the residual stream
    for i in range(dims.num_layers):
        p = f"layers.{i}"
        norm_w = w[f"{p}.input_norm.weight"]
        if pending is None:
            h = g.rms_norm(x, norm_w, eps, f"layers.{i}.input_norm")
        else:
            h, x = g.skip_rms_norm(x, pending, norm_w, eps, f"layers.{i}.input_norm")
        qkv_w = np.concatenate([w[f"{p}.attn.{n}.weight"] for n in "qkv"], axis=0)
        qkv_b = np.concatenate([w[f"{p}.attn.{n}.bias"] for n in "qkv"], axis=0) if desc.qkv_bias else None
        qkv = g.linear(h, qkv_w, qkv_b, f"layers.{i}.qkv")
        present = (f"present.{i}.key", f"present.{i}.value")
        if attention == "gqa":
            attn = _gqa_attention(g, qkv, pasts[i], present, seqlens_k, total_len, cos, sin, dims, i)
        else:
            attn = _standard_attention(g, qkv, pasts[i], present, lengths, dims, i)
        o = g.linear(attn, w[f"{p}.attn.o.weight"], w[f"{p}.attn.o.bias"] if desc.o_bias else None,
                     f"layers.{i}.o_proj")
        norm_w = w[f"{p}.post_attention_norm.weight"]
        if fused:
            h, x = g.skip_rms_norm(x, o, norm_w, eps, f"layers.{i}.post_attention_norm")
        else:
            x = g.op("Add", x, o, name=f"layers.{i}/attn_residual")
            h = g.rms_norm(x, norm_w, eps, f"layers.{i}.post_attention_norm")
        down = _mlp(g, h, w, dims, fused, i)
        if fused:
            pending = down
        else:
            x = g.op("Add", x, down, name=f"layers.{i}/mlp_residual")
        for name in present:
            g.output(name, TensorProto.FLOAT, ["batch", dims.num_kv_heads, "max_length", dims.head_dim])

    final_w = w["final_norm.weight"]
    if fused:
        # Norm then gather: on a prefill the norm is over S rows (cheap), and the residual
        # add needs no node of its own.
        if pending is None:   # no layers
            normed = g.rms_norm(x, final_w, eps, "final_norm")
        else:
            normed, _ = g.skip_rms_norm(x, pending, final_w, eps, "final_norm", keep_sum=False)
        last = _gather_last(g, normed, ids, seqlens_k)
    else:
        # Only the last real position of each row goes through the head: norm is per
        # position, so gathering first saves S - 1 rows of lm_head on a prefill.
        last = g.rms_norm(_gather_last(g, x, ids, seqlens_k), final_w, eps, "final_norm")
    # Tied embeddings: save_pretrained leaves lm_head out.
    tied = desc.tied_embeddings or "lm_head.weight" not in weights
    lm_head = w["embed.weight"] if tied else w["lm_head.weight"]
    logits = g.linear(last, lm_head, None, "lm_head")
    g.op("Identity", logits, outputs=["logits"], name="logits")
    g.output("logits", TensorProto.FLOAT, ["batch", dims.vocab_size])
    if project_down is not None:
        weight, bias = project_down
        if weight.shape[1] != dims.hidden_size:
            raise DecoderExportError(
                f"project_down weight has shape {weight.shape}; expected [visual_dim, {dims.hidden_size}]")
        regressed = g.linear(last, weight, bias, "project_down")
        g.op("Identity", regressed, outputs=["regressed"], name="regressed")
        g.output("regressed", TensorProto.FLOAT, ["batch", int(weight.shape[0])])

    doc = f"decoder, attention={attention}, max_length={max_length}"
    return g.model(uses_ms_domain=(attention == "gqa"), doc=doc)


def _embed(g: GraphBuilder, desc: DecoderDescription, w, ids: str, image_token_id: int | None,
           project_up: tuple[np.ndarray, np.ndarray] | None) -> str:
    """input_ids [B, S] -> the first hidden states [B, S, H] (visual embeddings spliced in)."""
    table = w["embed.weight"]
    if table.shape != (desc.vocab_size, desc.hidden_size):
        raise DecoderExportError(f"the token embedding has shape {table.shape}; the config says "
                                 f"[{desc.vocab_size}, {desc.hidden_size}]")
    if desc.embedding_scale != 1.0:  # scaled embeddings (sqrt(hidden) in some models): fold into the table
        table = table * np.float32(desc.embedding_scale)
    embeds = g.op("Gather", g.initializer("embed_tokens.weight", table), ids, axis=0, name="embed_tokens")
    if project_up is None:
        return embeds
    weight, bias = project_up
    if weight.shape[0] != desc.hidden_size:
        raise DecoderExportError(f"project_up weight has shape {weight.shape}; expected [{desc.hidden_size}, visual_dim]")
    images = g.input("image_embeds", TensorProto.FLOAT, ["image_tokens", int(weight.shape[1])])
    projected = g.linear(images, weight, bias, "project_up")                             # [N, H]
    is_image = g.op("Equal", ids, g.const(image_token_id), name="image_positions")       # [B, S]
    # NonZero lists positions in row-major order: the order images appear in the prompt.
    where = g.op("Transpose", g.op("NonZero", is_image, name="image_nonzero"), perm=[1, 0],
                 name="image_indices")                                                 # [N, 2]
    return g.op("ScatterND", embeds, where, projected, name="splice_images")


class _WeightReader:
    def __init__(self, weights):
        self.weights = weights

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise DecoderExportError(f"the weights have no tensor for {name!r} (canonical name), which the "
                                     "model's description says it has")
        return np.asarray(self.weights[name], dtype=np.float32)


class _Lengths:
    """Per-row positions derived once from seqlens_k and shared by every layer."""

    def __init__(self, g: GraphBuilder, ids: str, seqlens_k: str, total_len: str, dims: DecoderDescription):
        self.g, self.dims = g, dims
        shape = g.op("Shape", ids, name="lengths/Shape")
        self.batch = g.op("Gather", shape, g.const(0), axis=0, name="lengths/batch")       # scalar
        self.seq = g.op("Gather", shape, g.const(1), axis=0, name="lengths/sequence")      # scalar
        self.seqlens = g.op("Cast", seqlens_k, to=TensorProto.INT64, name="lengths/seqlens")  # [B]
        self.total = g.op("Cast", total_len, to=TensorProto.INT64, name="lengths/total")      # scalar
        # past_b = max(0, seqlens_k[b] + 1 - S)
        new_end = g.op("Sub", g.op("Add", self.seqlens, g.const(1), name="lengths/count"), self.seq,
                       name="lengths/past_raw")
        self.past = g.op("Max", new_end, g.const(0), name="lengths/past")                 # [B]

    def add_positions(self, cos: str, sin: str) -> None:
        g = self.g
        steps = g.op("Range", g.const(0), self.seq, g.const(1), name="positions/steps")   # [S]
        self.positions = g.op("Add", g.op("Unsqueeze", self.past, g.const([1]), name="positions/past"),
                              g.op("Unsqueeze", steps, g.const([0]), name="positions/steps2d"),
                              name="positions")                                           # [B, S]
        # cos/sin at each position, broadcast over heads: [B, S, 1, D/2]
        self.cos = g.op("Unsqueeze", g.op("Gather", cos, self.positions, axis=0, name="rope/cos"),
                        g.const([2]), name="rope/cos4d")
        self.sin = g.op("Unsqueeze", g.op("Gather", sin, self.positions, axis=0, name="rope/sin"),
                        g.const([2]), name="rope/sin4d")
        # ScatterND indices [B, kv_heads, S, 3] = (b, h, position[b, s])
        kv = self.dims.num_kv_heads
        target = g.op("Concat", g.op("Unsqueeze", self.batch, g.const([0]), name="scatter/b1"), g.const([kv]),
                      g.op("Unsqueeze", self.seq, g.const([0]), name="scatter/s1"), g.const([1]),
                      axis=0, name="scatter/shape")
        b_idx = g.op("Reshape", g.op("Range", g.const(0), self.batch, g.const(1), name="scatter/brange"),
                     g.const([-1, 1, 1, 1]), name="scatter/b4d")
        h_idx = g.const(np.arange(kv).reshape(1, kv, 1, 1))
        p_idx = g.op("Unsqueeze", self.positions, g.const([1, 3]), name="scatter/p4d")
        parts = [g.op("Expand", t, target, name=f"scatter/expand{j}") for j, t in enumerate((b_idx, h_idx, p_idx))]
        self.scatter_indices = g.op("Concat", *parts, axis=3, name="scatter/indices")
        # allowed[b, s, t] = t <= position[b, s]: causal within the row, and nothing past
        # the row's own length (rows of a ragged batch end at different places). [B,1,1,S,T]
        t = g.op("Range", g.const(0), self.total, g.const(1), name="mask/t")
        allowed = g.op("LessOrEqual", g.op("Reshape", t, g.const([1, 1, -1]), name="mask/t3d"),
                       g.op("Unsqueeze", self.positions, g.const([2]), name="mask/p3d"), name="mask/allowed")
        self.allowed = g.op("Unsqueeze", allowed, g.const([1, 2]), name="mask/allowed5d")
        self.total_1d = g.op("Unsqueeze", self.total, g.const([0]), name="mask/total1d")


def _gather_last(g: GraphBuilder, x: str, ids: str, seqlens_k: str) -> str:
    """x [B, S, H] -> the row of each batch row's last real token [B, H]: that token sits
    at index seqlens_k[b] - past_b = min(seqlens_k[b], S - 1) of this call's S (few nodes:
    each is a dispatch on every decode step)."""
    seq = g.op("Shape", ids, start=1, end=2, name="last/sequence")             # [1]
    last_slot = g.op("Sub", seq, g.const([1]), name="last/last_slot")
    seqlens = g.op("Cast", seqlens_k, to=TensorProto.INT64, name="last/seqlens")          # [B]
    index = g.op("Min", seqlens, last_slot, name="last/index")
    index = g.op("Unsqueeze", index, g.const([1]), name="last/index2d")                   # [B, 1]
    return g.op("GatherND", x, index, batch_dims=1, name="last/gather")                   # [B, H]


def _mlp(g: GraphBuilder, h: str, w: _WeightReader, dims: DecoderDescription, fused: bool, i: int) -> str:
    """down(silu(gate(h)) * up(h)). fused: gate and up as one MatMul over [gate | up], so
    one kernel call reads both weights and, under MatMulNBits, h is quantized once, not
    twice (3% of an int4 decode step on the 30M benchmark preset)."""
    p = f"layers.{i}.mlp"
    gate_w, up_w = w[f"{p}.gate.weight"], w[f"{p}.up.weight"]
    gate_b, up_b = (w[f"{p}.gate.bias"], w[f"{p}.up.bias"]) if dims.mlp_bias else (None, None)
    if fused:
        bias = None
        if gate_b is not None or up_b is not None:
            zeros = np.zeros(dims.intermediate_size, np.float32)
            bias = np.concatenate([zeros if gate_b is None else gate_b, zeros if up_b is None else up_b])
        both = g.linear(h, np.concatenate([gate_w, up_w], axis=0), bias, f"layers.{i}.gate_up_proj")
        gate, up = g.op("Split", both, g.const([dims.intermediate_size] * 2), axis=-1, outputs=2,
                        name=f"layers.{i}/gate_up_split")
    else:
        gate = g.linear(h, gate_w, gate_b, f"layers.{i}.gate_proj")
        up = g.linear(h, up_w, up_b, f"layers.{i}.up_proj")
    act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"layers.{i}/Sigmoid"), name=f"layers.{i}/silu")
    return g.linear(g.op("Mul", act, up, name=f"layers.{i}/gated"), w[f"{p}.down.weight"],
                    w[f"{p}.down.bias"] if dims.mlp_bias else None, f"layers.{i}.down_proj")


def _gqa_attention(g: GraphBuilder, qkv: str, past: tuple[str, str], present: tuple[str, str],
                   seqlens_k: str, total_len: str, cos: str, sin: str, dims: DecoderDescription, i: int) -> str:
    # Packed QKV: key and value inputs left empty, as the kernel expects for packing.
    out, _, _ = g.op("GroupQueryAttention", qkv, "", "", past[0], past[1], seqlens_k, total_len, cos, sin,
                     outputs=[f"layers.{i}.attn", present[0], present[1]], name=f"layers.{i}/GroupQueryAttention",
                     domain=MS_DOMAIN, num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads,
                     do_rotary=1, rotary_interleaved=0)
    return out


def _standard_attention(g: GraphBuilder, qkv: str, past: tuple[str, str], present: tuple[str, str],
                        lengths: _Lengths, dims: DecoderDescription, i: int) -> str:
    n, kv, d, grp = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.group
    p = f"layers.{i}"
    heads = g.op("Reshape", qkv, g.const([0, 0, n + 2 * kv, d]), name=f"{p}/heads")          # [B,S,n+2kv,D]
    q, k, v = g.op("Split", heads, g.const([n, kv, kv]), axis=2, outputs=3, name=f"{p}/split_qkv")
    half = g.const([d // 2, d // 2])

    def rotate(t: str, tag: str) -> str:
        t1, t2 = g.op("Split", t, half, axis=3, outputs=2, name=f"{p}/{tag}_halves")
        c, s = lengths.cos, lengths.sin
        r1 = g.op("Sub", g.op("Mul", t1, c, name=f"{p}/{tag}_1c"), g.op("Mul", t2, s, name=f"{p}/{tag}_2s"),
                  name=f"{p}/{tag}_r1")
        r2 = g.op("Add", g.op("Mul", t2, c, name=f"{p}/{tag}_2c"), g.op("Mul", t1, s, name=f"{p}/{tag}_1s"),
                  name=f"{p}/{tag}_r2")
        return g.op("Concat", r1, r2, axis=3, name=f"{p}/{tag}_rot")

    q, k = rotate(q, "q"), rotate(k, "k")
    # New rows into the shared buffers. k_new, v_new: [B, kv, S, D]
    k_new = g.op("Transpose", k, perm=[0, 2, 1, 3], name=f"{p}/k_bnsd")
    v_new = g.op("Transpose", v, perm=[0, 2, 1, 3], name=f"{p}/v_bnsd")
    k_all = g.op("ScatterND", past[0], lengths.scatter_indices, k_new, outputs=[present[0]], name=f"{p}/k_write")
    v_all = g.op("ScatterND", past[1], lengths.scatter_indices, v_new, outputs=[present[1]], name=f"{p}/v_write")
    # Live rows only: [B, kv, T, D] -> [B, kv, 1, T, D] so one K serves its `grp` query heads
    # through MatMul broadcasting instead of a repeat.
    k_live = g.op("Slice", k_all, g.const([0]), lengths.total_1d, g.const([2]), name=f"{p}/k_live")
    v_live = g.op("Slice", v_all, g.const([0]), lengths.total_1d, g.const([2]), name=f"{p}/v_live")
    k5 = g.op("Unsqueeze", k_live, g.const([2]), name=f"{p}/k5d")
    v5 = g.op("Unsqueeze", v_live, g.const([2]), name=f"{p}/v5d")
    # Query heads grouped by the KV head they share: h = kv_head * grp + j (repeat_kv's order).
    q5 = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, kv, grp, d]), name=f"{p}/q_groups"),
              perm=[0, 2, 3, 1, 4], name=f"{p}/q_bkgsd")                                       # [B,kv,grp,S,D]
    q5 = g.op("Mul", q5, g.const(1.0 / math.sqrt(d), np.float32), name=f"{p}/q_scaled")
    scores = g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3], name=f"{p}/k_t"),
                  name=f"{p}/scores")                                                          # [B,kv,grp,S,T]
    scores = g.op("Where", lengths.allowed, scores, g.const(np.finfo(np.float32).min, np.float32),
                  name=f"{p}/masked")
    probs = g.op("Softmax", scores, axis=-1, name=f"{p}/softmax")
    ctx = g.op("MatMul", probs, v5, name=f"{p}/context")                                      # [B,kv,grp,S,D]
    ctx = g.op("Transpose", ctx, perm=[0, 3, 1, 2, 4], name=f"{p}/context_bs")                # [B,S,kv,grp,D]
    return g.op("Reshape", ctx, g.const([0, 0, n * d]), name=f"{p}/attn")
