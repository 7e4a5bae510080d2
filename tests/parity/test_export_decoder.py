"""The decoder graph (token embedding inside) against the PyTorch model it was built from.

Parity is teacher-forced: fresh random token ids run through the ONNX decoder through its
KV cache (a prefill, then one position per step, then a multi-token continuation) and every
position's logits are compared with one full PyTorch forward over the whole sequence.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tiny_models import LLM_PRESETS, build_llm, llm_config
from emu_edge.export.adapters import ADAPTERS, from_model
from emu_edge.export.bundle_writer import BundleWriter, min_onnxruntime_for
from emu_edge.export.decoder import DecoderExportError, build_decoder, resolve_attention
from emu_edge.export.specs import DecoderSpec
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.manifest import KVSpec, ModelSpec

MAX_LENGTH = 64



def _desc(config):
    return ADAPTERS["LlamaForCausalLM"].describe(config)


def _build(model, attention, project_down=None, project_up=None, image_token_id=None):
    source = from_model(model)
    return build_decoder(source.description, source.weights, attention, MAX_LENGTH, project_down=project_down,
                         project_up=project_up, image_token_id=image_token_id)


def _variants(preset: str) -> list[str]:
    head_dim = _desc(llm_config(preset)).head_dim
    return ["gqa", "standard"] if head_dim % 16 == 0 else ["standard"]


CASES = [(p, v) for p in LLM_PRESETS for v in _variants(p)]


class OnnxDecoder:
    """Runs a decoder ModelProto with shared past/present buffers, as the runtime does."""

    def __init__(self, model_proto: onnx.ModelProto, config, batch: int = 1, max_length: int = MAX_LENGTH):
        dims = _desc(config)
        self.session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        shape = [batch, dims.num_kv_heads, max_length, dims.head_dim]
        self.kv = []
        for i in range(dims.num_layers):
            for part in ("key", "value"):
                # zero-filled, as the runtime's KVCache: see test_kv_cache_starts_zeroed
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self.kv.append(buf)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{part}", buf)
                self.binding.bind_ortvalue_output(f"present.{i}.{part}", buf)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, dims.vocab_size], np.float32)
        self.binding.bind_ortvalue_output("logits", self.logits)
        self.lengths = np.zeros(batch, np.int64)

    def run(self, ids: np.ndarray, counts=None, images: np.ndarray | None = None) -> np.ndarray:
        counts = np.full(ids.shape[0], ids.shape[1]) if counts is None else np.asarray(counts)
        totals = self.lengths + counts
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        if images is not None:
            self.binding.bind_cpu_input("image_embeds", np.ascontiguousarray(images, dtype=np.float32))
        self.binding.bind_cpu_input("seqlens_k", (totals - 1).astype(np.int32))
        self.binding.bind_cpu_input("total_sequence_length", np.array(totals.max(), np.int32))
        self.session.run_with_iobinding(self.binding)
        self.lengths = totals
        return self.logits.numpy().copy()


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("preset,attention", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_decoder_logits_match_torch_teacher_forced(preset, attention):
    model = build_llm(preset, seed=1)
    graph = _build(model, attention)
    x = np.random.default_rng(100 + len(preset)).integers(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(x)).logits[0].numpy()   # [24, V]
    dec = OnnxDecoder(graph, model.config)
    got = {6: dec.run(x[:, :7])[0]}                            # prefill 7
    for t in range(7, 16):                                     # steps
        got[t] = dec.run(x[:, t : t + 1])[0]
    got[22] = dec.run(x[:, 16:23])[0]                          # continuation of 7
    got[23] = dec.run(x[:, 23:24])[0]
    for t, logits in got.items():
        _assert_close(logits, ref[t], f"{preset}/{attention} position {t}")


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_ragged_batch_matches_each_row_alone(attention):
    model = build_llm("gqa", seed=2)
    graph = _build(model, attention)
    rng = np.random.default_rng(7)
    lengths = [3, 9, 6]
    rows = [rng.integers(1, model.config.vocab_size, (1, n + 4)) for n in lengths]
    with torch.no_grad():
        refs = [model(input_ids=torch.from_numpy(r)).logits[0].numpy() for r in rows]
    padded = np.zeros([3, max(lengths)], np.int64)
    for b, n in enumerate(lengths):
        padded[b, :n] = rows[b][0, :n]
    padded[0, 3:] = 5  # padding must not leak into any row
    dec = OnnxDecoder(graph, model.config, batch=3)
    got = dec.run(padded, lengths)
    for b, n in enumerate(lengths):
        _assert_close(got[b], refs[b][n - 1], f"row {b} after prefill")
    for s in range(4):
        step = np.stack([rows[b][0, lengths[b] + s] for b in range(3)])[:, None]
        got = dec.run(step, [1, 1, 1])
        for b, n in enumerate(lengths):
            _assert_close(got[b], refs[b][n + s], f"row {b} step {s}")


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_regressed_matches_project_down_of_final_hidden(attention):
    model = build_llm("gqa", seed=3)
    rng = np.random.default_rng(0)
    visual_dim = 24
    weight = rng.standard_normal((visual_dim, model.config.hidden_size)).astype(np.float32)
    bias = rng.standard_normal(visual_dim).astype(np.float32)
    graph = _build(model, attention, project_down=(weight, bias))
    feeds = DecoderSpec(_desc(model.config), MAX_LENGTH, attention, visual_dim).sample_inputs(batch=2, sequence=5)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(feeds["input_ids"])).last_hidden_state[:, -1].numpy()
    ref = hidden @ weight.T + bias
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    regressed = session.run(["regressed"], feeds)[0]
    assert regressed.shape == (2, visual_dim)
    np.testing.assert_allclose(regressed, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_graph_passes_checker_and_targets_old_onnxruntime(attention):
    model = build_llm("gqa")
    graph = _build(model, attention)
    onnx.checker.check_model(graph, full_check=True)
    onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    assert graph.ir_version <= 9
    opsets = {o.domain: o.version for o in graph.opset_import}
    assert opsets[""] <= 19
    domains = {n.domain for n in graph.graph.node}
    if attention == "standard":
        assert domains == {""}, "the standard variant must use standard ONNX ops only (TensorRT)"
        assert min_onnxruntime_for(graph) == "1.16"
    else:
        assert opsets["com.microsoft"] == 1
        assert any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
        assert min_onnxruntime_for(graph) == "1.20"


def test_gqa_graph_leaves_no_residual_add_after_onnxruntime_optimizes_it(tmp_path):
    """Every residual add of the "gqa" graph rides in the RMSNorm after it (onnxruntime's
    optimizer does not fuse a residual add whose sum is read again), so after the optimizer
    every remaining Add has a constant operand (an epsilon or a bias), and the whole graph
    is no more nodes than the layers need."""
    model = build_llm("gqa")
    dims = _desc(model.config)
    graph = _build(model, "gqa", project_down=(np.ones((8, model.config.hidden_size), np.float32), np.ones(8, np.float32)))
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in graph.graph.node) == 2 * dims.num_layers
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    constants = {t.name for t in optimized.graph.initializer}
    adds = [n for n in optimized.graph.node if n.op_type == "Add"]
    assert all(any(i in constants for i in n.input) for n in adds), [list(n.input) for n in adds]
    # Per layer: norm, qkv, attention, o_proj, gate, up, silu, gated product, down (9);
    # then the final norm, the last-token gather (6 small nodes), lm_head, project_down
    # (MatMul + bias) and the output Identities.
    assert len(optimized.graph.node) <= 9 * dims.num_layers + 20


def test_auto_attention_falls_back_for_head_dim_not_multiple_of_16():
    model = build_llm("head24")
    assert _desc(model.config).head_dim == 24
    assert resolve_attention("auto", 24) == "standard"
    assert resolve_attention("auto", 32) == "gqa"
    with pytest.raises(DecoderExportError, match="head_dim % 16"):
        _build(model, "gqa")
    graph = _build(model, "auto")
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)


def test_unsupported_rope_type_is_refused():
    model = build_llm("gqa", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(DecoderExportError, match="supported: default, llama3"):
        _build(model, "standard")


def test_external_data_above_threshold(tmp_path):
    model = build_llm("gqa", seed=4)
    graph = _build(model, "gqa")
    reference = OnnxDecoder(graph, model.config)
    out = tmp_path / "bundle"
    with BundleWriter(out, external_data_threshold=1000, log=lambda *_: None) as writer:
        dims = _desc(model.config)
        spec = writer.add_graph("decoder", graph, DecoderSpec(dims, MAX_LENGTH, "gqa"))
        writer.write_tokenizer(_tiny_tokenizer())
        writer.finish(ModelSpec(family="llm", vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, max_length=MAX_LENGTH,
                                kv=KVSpec(dims.num_layers, dims.num_kv_heads, dims.head_dim, attention="gqa")))
    assert spec.external_data and spec.external_data[0]["file"] == "decoder.onnx.data"
    assert (out / "decoder.onnx.data").stat().st_size > (out / "decoder.onnx").stat().st_size
    bundle = Bundle.open(out)  # hashes both files
    assert bundle.manifest.graphs["decoder"].external_data == spec.external_data
    loaded = onnx.load(str(out / "decoder.onnx"))  # pulls the external tensors back in
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 6))
    np.testing.assert_array_equal(OnnxDecoder(loaded, model.config).run(ids), reference.run(ids))
    assert not list(tmp_path.glob(".bundle.partial-*"))


def _tiny_tokenizer():
    from tiny_models import build_tokenizer

    return build_tokenizer(16)


# -- visual embeddings spliced in ----------------------------------------------------------


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_projected_images_are_spliced_in_row_major_order(attention):
    """Emu2's visual embeddings enter the decoder at the image token's positions, in
    row-major order: the logits equal PyTorch's on the spliced embeddings, for a prompt, for
    one regressed embedding fed back per row, and for a text step with no images."""
    model = build_llm("gqa", seed=6)
    rng = np.random.default_rng(2)
    hidden, visual_dim, image_id = model.config.hidden_size, 12, 7
    weight = rng.standard_normal((hidden, visual_dim)).astype(np.float32) * 0.1
    bias = rng.standard_normal(hidden).astype(np.float32) * 0.1
    graph = _build(model, attention, project_up=(weight, bias), image_token_id=image_id)
    onnx.checker.check_model(graph, full_check=True)
    table = model.get_input_embeddings().weight.detach().numpy()

    ids = rng.integers(10, model.config.vocab_size, (2, 10))
    ids[0, [1, 2, 6]] = image_id
    ids[1, [0, 5]] = image_id
    ids[:, 8] = image_id            # one regressed embedding per row, fed back as a step
    images = rng.standard_normal((7, visual_dim)).astype(np.float32)
    spliced = table[ids]
    projected = images @ weight.T + bias
    for k, (b, s) in enumerate([(0, 1), (0, 2), (0, 6), (1, 0), (1, 5), (0, 8), (1, 8)]):
        spliced[b, s] = projected[k]
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(spliced)).logits.numpy()   # [2, 10, V]

    dec = OnnxDecoder(graph, model.config, batch=2)
    empty = np.zeros((0, visual_dim), np.float32)
    got = dec.run(ids[:, :8], images=images[:5])
    last = dec.run(ids[:, 8:9], [1, 1], images=images[5:])
    text = dec.run(ids[:, 9:10], [1, 1], images=empty)
    for b in range(2):
        _assert_close(got[b], ref[b, 7], f"row {b} prompt")
        _assert_close(last[b], ref[b, 8], f"row {b} regressed step")
        _assert_close(text[b], ref[b, 9], f"row {b} text step")

    # A count that differs from the image tokens is an error, never a silent misplacement.
    with pytest.raises(Exception, match="ScatterND|updates"):
        OnnxDecoder(graph, model.config, batch=2).run(ids[:, :8], images=images[:4])


# -- adapters: one canonical decoder, several source layouts ------------------------------


def _emu3_folder(path):
    """A tiny random Emu3ForConditionalGeneration saved as transformers saves it."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vq = dict(codebook_size=16, embed_dim=8, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=1)
    torch.manual_seed(9)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map={"<image>": 5}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "text_model" in name or "lm_head" in name:
                p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def test_emu3_adapter_maps_the_text_model_onto_the_decoder(tmp_path):
    import json

    from transformers import Emu3ForConditionalGeneration

    from emu_edge.export.adapters import open_folder

    folder = _emu3_folder(tmp_path / "emu3")
    config_json = json.loads((folder / "config.json").read_text())
    source = open_folder(folder, config_json)
    assert source.adapter.family == "emu3" and source.description.rope_theta == 1e6
    assert source.weights.names["layers.1.attn.q.weight"] == "text_model.model.layers.1.self_attn.q_proj.weight"
    desc = source.description
    dec = OnnxDecoder(build_decoder(desc, source.weights, "gqa", MAX_LENGTH), source.config)
    ids = np.random.default_rng(3).integers(3, desc.vocab_size, (1, 12))
    reference = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    _assert_close(dec.run(ids[:, :9])[0], ref[8], "emu3 prefill")
    for t in range(9, 12):
        _assert_close(dec.run(ids[:, t:t + 1])[0], ref[t], f"emu3 step {t}")


def test_export_hf_refuses_an_unknown_architecture(tmp_path, capsys):
    from emu_edge.cli import main
    from tiny_models import build_tokenizer

    folder = _emu3_folder(tmp_path / "emu3")
    build_tokenizer(300).save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    assert main(["export-hf", "--llm", str(folder), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "MistralForCausalLM" in err and all(a in err for a in ADAPTERS)
    assert not (tmp_path / "b").exists()
