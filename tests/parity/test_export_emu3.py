"""`emu-edge export-hf DIR` of an Emu3ForConditionalGeneration folder: the emu3 bundle's
graphs and manifest fields against the folder and transformers' own model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tiny_models import EMU3_CHAT_TEMPLATE, EMU3_GENERATION, EMU3_PRESETS, make_emu3_folder, visual_token
from emu_edge.cli import main as cli_main
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.manifest import Manifest

ROLES = {"embed", "decoder", "vq_encoder", "vq_decoder"}
# one preset through each CLI form: the folder positional and --llm
FORMS = {"f2": lambda folder: [str(folder)], "f4": lambda folder: ["--llm", str(folder)]}


def export(args: list[str], out: Path, *extra: str) -> int:
    return cli_main(["export-hf", *args, "--out", str(out), "--max-length", "64", *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """preset -> (folder, bundle), made on first use."""
    made = {}

    def get(preset: str):
        if preset not in made:
            root = tmp_path_factory.mktemp(f"emu3_{preset}")
            folder = make_emu3_folder(root / "folder", preset)
            assert export(FORMS[preset](folder), root / "bundle") == 0
            made[preset] = folder, root / "bundle"
        return made[preset]

    return get


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_bundle_holds_the_four_graphs(preset, exported):
    _, bundle = exported(preset)
    manifest = Bundle.open(bundle).manifest
    assert manifest.model.family == "emu3" and manifest.model.architecture == "Emu3ForConditionalGeneration"
    assert {g.role for g in manifest.graphs.values()} == ROLES
    assert manifest.role("vq_encoder").names == {"pixel_values": "pixel_values", "codes": "codes"}
    assert manifest.role("vq_decoder").names == {"codes": "codes", "pixels": "pixels"}
    # f4's text model has GQA with head size 24: the standard-ops decoder
    assert manifest.model.kv.attention == {"f2": "gqa", "f4": "standard"}[preset]
    assert manifest.model.prompt is None
    assert (bundle / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_emu3_fields_are_what_the_folder_says(preset, exported):
    from tokenizers import Tokenizer
    from transformers import Emu3ImageProcessor

    folder, bundle = exported(preset)
    spec = Manifest.load(bundle).model.emu3
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vq = json.loads((folder / "config.json").read_text())["vq_config"]
    assert spec.codebook_size == vq["codebook_size"]
    assert spec.spatial_factor == 2 ** (len(vq["channel_multiplier"]) - 1)
    assert spec.temporal_factor == vq["temporal_downsample_factor"]
    assert [tok.id_to_token(i) for i in spec.visual_ids()] == [visual_token(c) for c in range(vq["codebook_size"])]
    named = {"eol_token_id": "<|extra_200|>", "eof_token_id": "<|extra_201|>", "boi_token_id": "<|image start|>",
             "eoi_token_id": "<|image end|>", "image_wrapper_token_id": "<|image token|>", "image_token_id": "<image>"}
    assert {key: getattr(spec, key) for key in named} == {key: tok.token_to_id(t) for key, t in named.items()}
    # no processor file in the folder: the image processor's defaults
    defaults = Emu3ImageProcessor()
    assert (spec.min_pixels, spec.max_pixels, spec.resize_factor) == (512 * 512, 1024 * 1024, 8)
    assert spec.image_mean == defaults.image_mean and spec.image_std == defaults.image_std
    assert spec.rescale_factor == pytest.approx(1 / 255) and spec.resample == "bicubic"
    model = Manifest.load(bundle).model
    assert model.generation == EMU3_GENERATION
    assert model.source["processor"] == "Emu3ImageProcessor defaults"


def test_processor_settings_come_from_the_folder(exported, tmp_path):
    from transformers import Emu3ImageProcessor

    from emu_edge.export.emu3_folder import read_emu3_folder

    folder = tmp_path / "folder"
    shutil.copytree(exported("f2")[0], folder)
    Emu3ImageProcessor(min_pixels=64 * 64, max_pixels=128 * 128, spatial_factor=16, image_mean=[0.5] * 3,
                       image_std=[0.25] * 3).save_pretrained(folder)
    fields, sources = read_emu3_folder(folder, json.loads((folder / "config.json").read_text()))
    assert (fields["min_pixels"], fields["max_pixels"], fields["resize_factor"]) == (4096, 16384, 16)
    assert (fields["image_mean"], fields["image_std"]) == ([0.5] * 3, [0.25] * 3)
    assert fields["resample"] == "bicubic"   # saved as the int 3: written by its PIL name
    assert sources["processor"] in ("preprocessor_config.json", "processor_config.json")


# Turns numbered by position: no fixed parts write them, so the exporter writes no layout.
NUMBERED_TEMPLATE = ("{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: "
                     "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_template_is_rendered_into_the_layout_or_left_out(exported, tmp_path, capsys):
    from emu_edge.export.emu3_folder import emu3_chat_layout

    folder = tmp_path / "folder"
    shutil.copytree(exported("f2")[0], folder)
    manifest = Manifest.load(exported("f2")[1])
    assert manifest.model.prompt is None             # no template: no layout
    assert emu3_chat_layout(folder, 1, None) == (None, None)
    # tokenizer_config.json's template, as tokenizers save it
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": EMU3_CHAT_TEMPLATE}))
    layout, source = emu3_chat_layout(folder, 1, 133)
    assert source == "tokenizer_config.json" and layout.begin == ["<s>"] and layout.tokens == {"<s>": 1, "<image>": 133}
    assert layout.user == [{"text": "USER: "}] and layout.assistant == [{"text": "ASSISTANT:"}]
    (folder / "chat_template.jinja").write_text(NUMBERED_TEMPLATE)
    capsys.readouterr()
    assert emu3_chat_layout(folder, 1, 133) == (None, None)
    assert "the chat template is not written into the manifest" in capsys.readouterr().out


def _reference(folder: Path):
    from transformers import Emu3ForConditionalGeneration

    return Emu3ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_decoder_logits_equal_transformers(preset, exported):
    """One prefill of text and visual ids through the bundle's embed and decoder graphs."""
    folder, bundle = exported(preset)
    manifest = Manifest.load(bundle)
    embed, decoder = manifest.role("embed"), manifest.role("decoder")
    kv = manifest.model.kv
    ids = np.random.default_rng(5).integers(3, manifest.model.vocab_size, (2, 11))
    embeds = _session(bundle / embed.file).run([embed.name("inputs_embeds")], {embed.name("input_ids"): ids})[0]
    feeds = {decoder.name("inputs_embeds"): embeds, decoder.name("seqlens_k"): np.full(2, 10, np.int32),
             decoder.name("total_sequence_length"): np.array(11, np.int32)}
    for i in range(kv.num_layers):
        for key in ("past_key", "past_value"):
            feeds[decoder.name(key, i)] = np.zeros((2, kv.num_kv_heads, manifest.model.max_length, kv.head_dim),
                                                   np.float32)
    got = _session(bundle / decoder.file).run([decoder.name("logits")], feeds)[0]
    with torch.no_grad():
        want = _reference(folder)(input_ids=torch.from_numpy(ids)).logits[:, -1].numpy()
    assert got.shape == want.shape == (2, manifest.model.vocab_size)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_vq_graphs_match_the_folders_vqmodel(preset, exported):
    folder, bundle = exported(preset)
    manifest = Manifest.load(bundle)
    f = manifest.model.emu3.spatial_factor
    h, w = 5, 7   # codes: not square
    pixels = np.random.default_rng(7).uniform(-1, 1, (1, 3, h * f, w * f)).astype(np.float32)
    vq = _reference(folder).model.vqmodel
    with torch.no_grad():
        want = vq.encode(torch.from_numpy(pixels), torch.tensor([[h * f, w * f]])).image_tokens[0].numpy()
        image = vq.decode(torch.from_numpy(want)[None]).numpy()
    enc, dec = manifest.role("vq_encoder"), manifest.role("vq_decoder")
    codes = _session(bundle / enc.file).run([enc.name("codes")], {enc.name("pixel_values"): pixels})[0]
    np.testing.assert_array_equal(codes[0], want)
    got = _session(bundle / dec.file).run([dec.name("pixels")], {dec.name("codes"): codes})[0]
    np.testing.assert_allclose(got, image, atol=1e-4, rtol=0)


def test_pipeline_opens_the_bundle_with_its_family(exported):
    from emu_edge.runtime.families.emu3 import Emu3
    from emu_edge.runtime.pipeline import Pipeline

    assert isinstance(Pipeline.load(exported("f2")[1]).family, Emu3)


def test_an_llm_folder_exports_through_the_positional_form(llm_folders, tmp_path):
    assert export([str(llm_folders("gqa"))], tmp_path / "bundle") == 0
    assert Manifest.load(tmp_path / "bundle").model.family == "llm"


def test_refusals_name_the_problem_and_write_nothing(exported, tmp_path, capsys):
    good = exported("f2")[0]

    def fails(folder: Path, *expected: str, args=None) -> None:
        out = tmp_path / "never"
        assert export(args or [str(folder)], out) == 1
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert not out.exists() and not list(tmp_path.glob(".never.partial-*")), "a failed export wrote something"

    fails(good, "give the folder to export once", args=[str(good), "--llm", str(good)])

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    config = json.loads((good / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, architectures=["ChameleonForConditionalGeneration"])))
    fails(broken, "ChameleonForConditionalGeneration", "supported: LlamaForCausalLM")

    # the text model alone: the VQ-VAE's tensors dropped
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, broken, dirs_exist_ok=True)
    weights = load_file(str(good / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("vqmodel.")}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    fails(broken, "VQ-VAE tensors", "vqmodel.")

    # a tokenizer without the visual tokens
    shutil.copytree(good, broken, dirs_exist_ok=True)
    data = json.loads((good / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("<|visual token")]
    (broken / "tokenizer.json").write_text(json.dumps(data))
    fails(broken, "0 visual tokens", "codebook has 64 codes")
