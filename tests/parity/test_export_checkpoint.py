"""`emu-edge export` of our checkpoint: bundle contents, per-graph parity, safe failure."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from emu_edge.cli import main
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.manifest import SCHEMA_VERSION


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def test_bundle_has_every_graph_and_manifest_field(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["graphs"]) >= {"vision_encoder", "decoder", "unet"}
    for name, g in manifest["graphs"].items():
        for field in ("role", "file", "sha256", "precision", "precisions", "names", "inputs", "outputs",
                      "dynamic_axes", "profiles", "domains", "ir_version", "opset", "min_onnxruntime"):
            assert field in g, f"{name}: {field}"
        assert g["ir_version"] <= 9 and g["opset"] <= 19
        model = onnx.load(str(tiny_bundle / g["file"]))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        # Every tensor the runtime binds by role is one the graph has.
        tensors = {io["name"] for io in g["inputs"] + g["outputs"]}
        assert g["names"] and all(n.format(layer=0) in tensors for n in g["names"].values()), name
        assert g["role"] == name and g["precision"] in g["precisions"]
    m = manifest["model"]
    assert m["family"] == "emu2"
    for field in ("max_length", "kv", "generation", "prompt", "emu2"):
        assert m.get(field) not in (None, {}, []), field
    for field in ("n_query", "image_size", "image_mean", "image_std", "unconditional_embedding", "scheduler"):
        assert m["emu2"].get(field) not in (None, {}, []), field
    assert set(m["prompt"]["tokens"]) >= {"[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]", "<s>", "</s>", "<pad>"}
    assert m["prompt"]["placeholder"] == "<image>"
    assert (tiny_bundle / "tokenizer.json").exists()
    unet = manifest["graphs"]["unet"]
    assert next(i for i in unet["inputs"] if i["name"] == "timestep")["dtype"] == "float32"


def test_vision_encoder_parity(tiny_bundle, tiny_model):
    model, _, cfg = tiny_model
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    image_embeds, frame_embeds = _session(tiny_bundle / "vision_encoder.onnx").run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert _rel_err(image_embeds, model.encoder(x, cfg.n_query).numpy()) <= 1e-4
        assert _rel_err(frame_embeds, model.encoder(x, cfg.frame_n_query).numpy()) <= 1e-4


def test_unet_parity_with_batch_and_fractional_timesteps(tiny_bundle, tiny_model):
    model, _, cfg = tiny_model
    b = 5  # any batch: cond and uncond go through in one call
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size)
    t = torch.rand(b) * 999  # fractional, as Euler's are
    cond = torch.randn(b, cfg.n_query, cfg.vision_hidden)
    (got,) = _session(tiny_bundle / "unet.onnx").run(
        None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": cond.numpy()})
    with torch.no_grad():
        want = model.unet(x, t, encoder_hidden_states=cond).sample.numpy()
    assert _rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_decoder_teacher_forcing_parity_on_a_multimodal_prompt(request, tiny_model, attention):
    """The regressed embedding and logits at every position, the bundle run step by step
    through its KV cache against one full PyTorch forward."""
    from emu_edge import data
    from emu_edge.runtime.pipeline import Pipeline
    from emu_edge.training.generate import _visuals

    bundle = request.getfixturevalue({"gqa": "tiny_bundle", "standard": "tiny_bundle_standard"}[attention])
    assert Bundle.open(bundle).manifest.model.kv.attention == attention
    pipe = Pipeline.load(bundle)
    model, _, cfg = tiny_model
    sample = data.vqa("test", 1, seed=7, size=cfg.image_size)[0]
    enc = pipe.builder.encode("vqa", [(s.kind, s.value) for s in sample.segments])
    visual = pipe.encode_visuals(enc.visuals)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([enc.ids]), _visuals(model, enc))
        logits, regressed, _ = model.decode(embeds)
    # The image positions are fed one at a time too, each with its own visual embedding:
    # the splice inside the decoder graph is checked at every position, not just the prompt.
    ids = np.array(enc.ids)
    is_image = ids == pipe.manifest.model.prompt.placeholder_id
    assert is_image.sum() == len(visual) > 0
    order = np.cumsum(is_image) - 1

    def visual_of(lo, hi):
        return visual[order[lo:hi][is_image[lo:hi]]] if is_image[lo:hi].any() else None

    session = pipe.session(1)
    out = session.prefill([enc.ids[:5]], visual_of(0, 5))
    got_logits, got_reg = [out.logits[0]], [out.regressed[0]]
    for i in range(5, len(enc.ids)):
        out = session.extend([[enc.ids[i]]], visual_of(i, i + 1))
        got_logits.append(out.logits[0])
        got_reg.append(out.regressed[0])
    assert _rel_err(np.stack(got_logits), logits[0, 4:].numpy()) <= 1e-4
    assert _rel_err(np.stack(got_reg), regressed[0, 4:].numpy()) <= 1e-4


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("steps"))
    (broken / "unet" / "config.json").write_text("{not json")
    out = tmp_path / "bundle"
    assert main(["export", str(broken), "--out", str(out)]) == 1
    assert "unet" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"], "a partial bundle was left behind"


@pytest.mark.parametrize("damage, named", [
    (lambda ck: (ck / "emu.json").unlink(), "emu.json"),
    (lambda ck: (ck / "projections.safetensors").write_bytes(b"\0" * 10), "projections.safetensors"),
    (lambda ck: (ck / "llm" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}'), "LlamaForCausalLM"),
])
def test_bad_checkpoint_errors_name_the_problem(tiny_checkpoint, tmp_path, capsys, damage, named):
    broken = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("steps"))
    damage(broken)
    assert main(["export", str(broken), "--out", str(tmp_path / "b")]) == 1
    assert named in capsys.readouterr().err


def test_export_hf_vision_and_unet_folders(tiny_checkpoint, tmp_path):
    """A user's CLIPVisionModel and UNet2DConditionModel folders go through export-hf."""
    out = tmp_path / "hf"
    ck = tiny_checkpoint
    assert main(["export-hf", "--llm", str(ck / "llm"), "--vision", str(ck / "vision"), "--unet", str(ck / "unet"),
                 "--n-query", "4", "--frame-n-query", "1", "--out", str(out)]) == 0
    bundle = Bundle.open(out)
    assert {"decoder", "vision_encoder", "unet"} <= set(bundle.manifest.graphs)
    assert bundle.manifest.model.emu2.n_query == 4 and bundle.manifest.model.emu2.image_size == 16
