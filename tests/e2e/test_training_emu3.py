"""emu3's stage 1 on the tiny preset, over the tiny VQ-VAE of stage 0: the decoder trains
on Emu3's formats, resumes to the uninterrupted run's weights, and the folder it writes is
an Emu3ForConditionalGeneration folder that transformers generates from and that
`emu-edge export-hf` exports unchanged for the runtime."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emu_edge import data
from emu_edge.cli import main
from emu_edge.training.config import get_emu3_preset, get_vq_preset
from emu_edge.training.emu3_format import CodeCache, Emu3Format, TokenIds, build_tokenizer, visual_token
from emu_edge.training.train_emu3 import train_decoder
from emu_edge.training.train_vq import train_vq

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """A finished tiny stage 0 (vq/, judge.onnx), copied by each test that trains on it."""
    out = tmp_path_factory.mktemp("emu3") / "stage0"
    train_vq(get_vq_preset("tiny"), out, **QUIET)
    return out


@pytest.fixture(scope="module")
def tiny_emu3(stage0, tmp_path_factory):
    import shutil

    out = tmp_path_factory.mktemp("emu3") / "run"
    shutil.copytree(stage0, out)
    assert main(["train", "--family", "emu3", "--preset", "tiny", "--stages", "1", "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    return out


def _copy(stage0, path):
    import shutil

    shutil.copytree(stage0, path)
    return path


def _last_step(out):
    step = json.loads((out / "steps" / "latest.json").read_text())["step"]
    return step, load_file(str(out / "steps" / step / "model.safetensors"))


def test_sequences_are_written_in_emu3_formats(stage0):
    from transformers import Emu3ImageProcessor, Emu3VQVAE

    vq = Emu3VQVAE.from_pretrained(stage0 / "vq").eval()
    codes = CodeCache(vq, Emu3ImageProcessor.from_pretrained(stage0 / "vq"))
    tok = build_tokenizer(300, vq.config.codebook_size)
    ids = TokenIds.of(tok, vq.config.codebook_size)
    fmt = Emu3Format(tok, ids)
    assert tok.token_to_id(visual_token(5)) == ids.visual_start + 5

    t2i = data.text_to_image("train", 1, size=32)[0]
    seq = fmt.encode(t2i, codes)
    grid = codes(t2i.segments[-1].value)
    assert grid.shape == (4, 4)
    header = [ids.bos] + fmt.text(t2i.segments[0].value) + [ids.boi] + fmt.text("4*4") + [ids.wrapper]
    assert seq.ids[:len(header)] == header
    rows = np.asarray(seq.ids[len(header):len(header) + 20]).reshape(4, 5)
    assert (rows[:, 4] == ids.eol).all() and (rows[:, :4] - ids.visual_start == grid).all()
    assert seq.ids[-3:] == [ids.eof, ids.eoi, ids.eos]
    # The loss falls on everything after the header: the image, EOF, EOI, EOS.
    assert [t for t in seq.targets if t != -100] == seq.ids[len(header):]
    dropped = fmt.encode(t2i, codes, drop_prompt=True)
    assert dropped.ids[:2] == [ids.bos, ids.boi] and dropped.ids[-24:] == seq.ids[-24:]
    # Sides of 256 and more are keyed too (one byte per side could not hold them).
    big = np.zeros((256, 256, 3), np.uint8)
    assert codes(big).shape == (32, 32) and codes(big[:, :128]).shape == (32, 16) and len(codes) == 3

    vqa = data.vqa("train", 1, size=32)[0]
    seq = fmt.encode(vqa, codes)
    image = fmt.image(codes(vqa.segments[0].value))
    question = fmt.text(vqa.segments[1].value)
    answer = fmt.text(" " + vqa.segments[2].value)
    assert seq.ids == [ids.bos] + image + question + answer + [ids.eos]
    assert [t for t in seq.targets if t != -100] == answer + [ids.eos]
    assert tok.decode(answer).strip() == vqa.segments[2].value

    # What transformers' processor writes for the same image and question, once its
    # placeholders are the visual ids (as Emu3ForConditionalGeneration fills them).
    from emu_edge.training.train_emu3 import hf_tokenizer
    from transformers import Emu3Processor

    processor = Emu3Processor(Emu3ImageProcessor.from_pretrained(stage0 / "vq"), hf_tokenizer(tok))
    theirs = processor(images=[vqa.segments[0].value], text=["<image>" + vqa.segments[1].value])["input_ids"][0]
    mine = [ids.bos] + image + question
    assert len(theirs) == len(mine)
    assert all(t == m or (t == ids.placeholder and (ids.visual_start <= m or m == ids.eol))
               for t, m in zip(theirs, mine))

    cached = len(codes)
    codes(vqa.segments[0].value)
    assert len(codes) == cached, "an image is encoded once"


def test_tiny_run_logs_every_step_and_writes_an_emu3_folder(tiny_emu3):
    from transformers import Emu3ForConditionalGeneration

    cfg = get_emu3_preset("tiny")
    rows = [json.loads(line) for line in (tiny_emu3 / "metrics.jsonl").read_text().splitlines()]
    decoder = [r for r in rows if r["stage"] == 1]
    assert [r["step"] for r in decoder] == list(range(1, cfg.steps + 1))
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in decoder)
    assert decoder[-1]["loss"] < decoder[0]["loss"], "the loss did not fall"
    assert (tiny_emu3 / "loss.png").stat().st_size > 0

    model = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3).eval()
    step, trained = _last_step(tiny_emu3)
    assert step == f"1-{cfg.steps:06d}"
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained["model." + name]), name
    # The VQ-VAE is stage 0's, untouched.
    vq = load_file(str(tiny_emu3 / "vq" / "model.safetensors"))
    for name, value in vq.items():
        assert torch.equal(model.model.vqmodel.state_dict()[name], value), name
    generation = json.loads((tiny_emu3 / "generation_config.json").read_text())
    assert generation["negative_prompt"] == "" and generation["guidance_scale"] == cfg.guidance_scale
    assert json.loads((tiny_emu3 / "processor_config.json").read_text())["image_area"] == 32 * 32


def test_transformers_generates_an_image_grid_from_the_folder(tiny_emu3):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    model = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3).eval()
    processor = Emu3Processor.from_pretrained(tiny_emu3)
    inputs = processor(text=["a red circle"], return_for_image_generation=True, image_area=32 * 32,
                       return_tensors="pt")
    negative = processor(text=[""], return_for_image_generation=True, image_area=32 * 32, return_tensors="pt")
    h, w = inputs.pop("image_sizes")[0]
    assert (h, w) == (4, 4)
    tok = processor.tokenizer
    eol, eof, eoi, eos = (tok.convert_tokens_to_ids(t) for t in ("<|extra_200|>", "<|extra_201|>", "<|image end|>",
                                                                  "</s>"))
    visual = model.vocabulary_mapping.image_tokens
    start = inputs["input_ids"].shape[1]

    def allowed(batch, ids):   # the row structure, as transformers' docs constrain it
        pos = ids.shape[0] - start
        if pos < h * (w + 1):
            return [eol] if pos % (w + 1) == w else visual
        return [[eof], [eoi]][pos - h * (w + 1)] if pos < h * (w + 1) + 2 else [eos]

    out = model.generate(**inputs, max_new_tokens=h * (w + 1) + 3, do_sample=False, prefix_allowed_tokens_fn=allowed,
                         negative_prompt_ids=negative["input_ids"], guidance_scale=3.0)
    new = out[:, start:]
    grid = new[0, :h * (w + 1)].view(h, w + 1)
    assert (grid[:, w] == eol).all() and torch.isin(grid[:, :w], torch.tensor(visual)).all()
    pixels = model.decode_image_tokens(image_tokens=new, height=h, width=w)
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()


def test_export_hf_takes_the_folder_unchanged_and_the_runtime_generates(tiny_emu3, tmp_path):
    from PIL import Image

    from emu_edge.runtime.pipeline import Pipeline

    bundle = tmp_path / "bundle"
    assert main(["export-hf", str(tiny_emu3), "--out", str(bundle)]) == 0
    pipe = Pipeline.load(bundle, threads=1)
    model = pipe.manifest.model
    assert model.family == "emu3" and model.generation["guidance_scale"] == get_emu3_preset("tiny").guidance_scale
    assert model.emu3.image_area == 32 * 32 and model.emu3.codebook_size == get_vq_preset("tiny").codebook_size
    image = pipe.generate_image("a red circle", seed=0)
    assert image.size == (32, 32)
    scene = data.captioning("test", 1, size=32)[0].segments[0].value
    assert isinstance(pipe.generate_text([Image.fromarray(scene)], max_new_tokens=4), str)


def test_interrupted_and_resumed_run_matches_uninterrupted(stage0, tmp_path):
    cfg = get_emu3_preset("tiny")
    straight, resumed = _copy(stage0, tmp_path / "straight"), _copy(stage0, tmp_path / "resumed")
    train_decoder(cfg, straight, resume=True, **QUIET)
    train_decoder(cfg, resumed, resume=True, stop_after=cfg.steps // 2 + 1, **QUIET)
    assert not (resumed / "model.safetensors").exists()
    train_decoder(cfg, resumed, resume=True, **QUIET)
    (a_step, a), (b_step, b) = _last_step(straight), _last_step(resumed)
    assert a_step == b_step and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (straight / "tokenizer.json").read_text() == (resumed / "tokenizer.json").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--stages", "1,0"], "stages are 0 (the VQ-VAE) and 1 (the decoder), in order"),
    (["--stages", "2"], "stages are 0"),
    (["--stages", "1", "--resume"], "run stage 0 first"),
    (["--stages", "1", "--overwrite"], "stage 0's vq/ and judge.onnx too"),
])
def test_bad_decoder_requests_are_refused(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--family", "emu3", "--preset", "tiny", "--out", str(tmp_path / "run"), *argv])
    assert message in str(e.value)


def test_the_decoder_stage_over_a_finished_stage_0_needs_resume(stage0, tmp_path):
    run = _copy(stage0, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(["train", "--family", "emu3", "--preset", "tiny", "--stages", "1", "--out", str(run)])
    assert "--resume" in str(e.value)
    with pytest.raises(SystemExit, match="holds an emu3 run .* pass --family emu3"):
        main(["train", "--preset", "tiny", "--out", str(run), "--resume"])


def test_shipped_folder_is_scored_through_its_bundle_and_a_rerun_on_the_bundle_agrees(tiny_emu3, tmp_path):
    from emu_edge.training.ship import ship_emu3

    shipped = ship_emu3(tiny_emu3, tmp_path / "shipped", generation={"guidance_scale": 2.0, "top_k": 4})
    assert json.loads((shipped / "generation_config.json").read_text())["top_k"] == 4
    first = tmp_path / "eval.json"
    assert main(["eval", str(shipped), "--family", "emu3", "--scale", "0.02", "--json", str(first)]) == 0
    metrics = json.loads(first.read_text())
    for key in ("caption_accuracy", "vqa_accuracy", "digit_accuracy", "t2i_attribute_accuracy",
                "t2i_shuffled_baseline", "reconstruction_accuracy", "autoencode_similarity", "judge_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["generation"]["guidance"] == 2.0 and metrics["generation"]["top_k"] == 4
    assert metrics["samples"]["text_to_image"] == 4 and metrics["image_size"] == 32
    # The figures do not depend on what else runs, and a rerun on the exported bundle (what
    # a quantized bundle is scored by) reproduces them.
    bundle = tmp_path / "bundle"
    assert main(["export-hf", str(shipped), "--out", str(bundle)]) == 0
    with pytest.raises(SystemExit, match="--judge"):
        main(["eval", str(bundle), "--scale", "0.02"])
    rerun = {}
    for only in ("reconstruction", "text_to_image,judge"):  # the judge apart from the round trip
        again = tmp_path / "again.json"
        assert main(["eval", str(bundle), "--judge", str(shipped / "judge.onnx"), "--scale", "0.02", "--only",
                     only, "--json", str(again)]) == 0
        rerun |= json.loads(again.read_text())
    for key in ("t2i_attribute_accuracy", "t2i_shuffled_baseline", "reconstruction_accuracy", "autoencode_similarity",
                "judge_accuracy"):
        assert rerun[key] == metrics[key], key
    assert rerun["breakdown"]["t2i"] == metrics["breakdown"]["t2i"]


def test_a_run_from_a_finished_folder_starts_at_its_weights_over_its_vq(tiny_emu3, tmp_path):
    cfg = get_emu3_preset("tiny")
    cfg.steps, cfg.lr, cfg.seed = 1, 1e-12, 1  # one step too small to move the weights
    cont = tmp_path / "cont"
    train_decoder(cfg, cont, init_from=tiny_emu3, **QUIET)
    theirs, mine = load_file(str(tiny_emu3 / "model.safetensors")), load_file(str(cont / "model.safetensors"))
    assert theirs.keys() == mine.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    vq_theirs, vq_mine = (load_file(str(run / "vq" / "model.safetensors")) for run in (tiny_emu3, cont))
    assert vq_theirs.keys() == vq_mine.keys() and all(torch.equal(vq_mine[k], v) for k, v in vq_theirs.items())
    assert (cont / "judge.onnx").read_bytes() == (tiny_emu3 / "judge.onnx").read_bytes()
    assert json.loads((cont / "decoder_config.json").read_text())["init_from"] == str(tiny_emu3)


def test_a_run_from_a_folder_of_another_architecture_is_refused(tiny_emu3, tmp_path):
    from emu_edge.training.checkpoint import CheckpointError

    cfg = get_emu3_preset("tiny")
    cfg.hidden_size *= 2
    with pytest.raises(CheckpointError, match="not the tiny preset's architecture"):
        train_decoder(cfg, tmp_path / "cont", init_from=tiny_emu3, **QUIET)
    with pytest.raises(SystemExit, match="starts the decoder stage"):
        main(["train", "--family", "emu3", "--preset", "tiny", "--out", str(tmp_path / "both"),
              "--init-from", str(tiny_emu3)])
