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

ROLES = {"decoder", "vq_encoder", "vq_decoder"}
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
    """One prefill of text and visual ids through the bundle's decoder graph."""
    folder, bundle = exported(preset)
    manifest = Manifest.load(bundle)
    decoder = manifest.role("decoder")
    kv = manifest.model.kv
    ids = np.random.default_rng(5).integers(3, manifest.model.vocab_size, (2, 11))
    feeds = {decoder.name("input_ids"): ids, decoder.name("seqlens_k"): np.full(2, 10, np.int32),
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


# -- max_length: room for the largest generated image ---------------------------------------
# The f2 folder: 2 pixels per code, max_position_embeddings 512, and a tokenizer that reads
# "{rows}*{cols}" as one (unknown) token, so a generation prompt's header is 4 tokens: BOS,
# BOI, the size, IMAGE_WRAPPER.


def test_max_image_sizes_the_default_max_length(exported, tmp_path, capsys):
    from emu_edge.runtime.pipeline import Pipeline

    folder = exported("f2")[0]
    out = tmp_path / "bundle"
    assert cli_main(["export-hf", str(folder), "--out", str(out), "--max-image", "12x10"]) == 0
    # 6 rows of 5 codes, an EOL each, then EOF: 37 tokens; + the header + 256 of prompt
    assert Manifest.load(out).model.max_length == 37 + 4 + 256
    assert "max_length 297: a 12x10 image (--max-image) is 37 tokens" in capsys.readouterr().out
    # the image fits beside a prompt of 256 words (one token each)
    pipe = Pipeline.load(out, threads=1)
    assert pipe.generate_image(" ".join(["w5"] * 256), height=12, width=10, top_k=1).size == (10, 12)


def test_the_default_image_and_an_explicit_max_length(exported):
    from emu_edge.export.emu3_folder import ImageRoom

    folder = exported("f2")[0]
    room = ImageRoom.of_folder(folder, json.loads((folder / "config.json").read_text()), bos_id=1)
    lines = []
    # image_area 36: 6x6 pixels, 3x3 codes: 13 tokens
    assert room.max_length(36, 512, None, None, log=lines.append) == 13 + 4 + 256
    assert "(the folder's image_area, 36 pixels)" in lines[-1]
    # the processor's default area (720x720: 360x360 codes) is capped, with the largest square that fits:
    # 15 * 16 + 1 + 4 + 256 <= 512 < 16 * 17 + 1 + 4 + 256
    assert room.max_length(720 * 720, 512, None, None, log=lines.append) == 512
    assert lines[-1].startswith("max_length 512 (max_position_embeddings)") and "is 30x30" in lines[-1]
    # an explicit --max-length is kept; its line says whether the image fits
    assert room.max_length(36, 512, 400, None, log=lines.append) == 400
    assert lines[-1].startswith("max_length 400 (--max-length): room for a 6x6 image") and "need 273" in lines[-1]
    assert room.max_length(36, 512, 100, None, log=lines.append) == 100
    assert lines[-1] == ("max_length 100 (--max-length) is short of the 273 positions a 6x6 image (the folder's "
                         "image_area, 36 pixels) and a 256-token prompt need; no image fits with a 256-token prompt")


def test_a_bad_max_image_is_one_line_and_writes_nothing(exported, llm_folders, tmp_path, capsys):
    def fails(folder: Path, size: str, *expected: str) -> None:
        out = tmp_path / "never"
        assert cli_main(["export-hf", str(folder), "--out", str(out), "--max-image", size]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(text in err for text in expected), err
        assert not out.exists() and not list(tmp_path.glob(".never.partial-*")), "a failed export wrote something"

    folder, llm = exported("f2")[0], llm_folders("gqa")
    capsys.readouterr()   # what making the folders printed
    fails(folder, "13x10", "multiples of 2 pixels", "the nearest valid sizes are 12x10 or 14x10")
    fails(folder, "1x4", "the nearest valid sizes are 2x4")
    fails(folder, "12by10", "--max-image takes HEIGHTxWIDTH in pixels")
    fails(folder, "720x720", "need 130221 positions", "max_position_embeddings 512",
          "the largest square image that fits is 30x30")
    fails(llm, "12x10", "--max-image sizes the context for the images an Emu3 folder generates")
