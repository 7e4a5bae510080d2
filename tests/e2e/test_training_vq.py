"""emu3's stage 0 on the tiny preset: the VQ-VAE trains, saves a folder transformers loads,
resumes to the uninterrupted run's weights, and its reconstructions are scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emu_edge.cli import main
from emu_edge.training.checkpoint import CheckpointError
from emu_edge.training.config import VQ_PRESETS, get_vq_preset
from emu_edge.training.train_vq import train_vq, vq_images
from emu_edge.training.vq import EMACodebook, decode, encode, image_processor, to_images, to_pixels


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "run"
    assert main(["train", "--family", "emu3", "--preset", "tiny", "--stages", "0", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def _last_step(out):
    step = json.loads((out / "steps" / "latest.json").read_text())["step"]
    return load_file(str(out / "steps" / step / "model.safetensors"))


def test_tiny_run_logs_every_step_and_saves_a_transformers_folder(tiny_vq):
    from transformers import Emu3ImageProcessor, Emu3VQVAE

    cfg = get_vq_preset("tiny")
    rows = [json.loads(line) for line in (tiny_vq / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "recon", "commit", "perplexity", "psnr", "grad_norm"))
        assert 1 <= r["perplexity"] <= r["codes_used"] <= cfg.codebook_size
        assert 0 <= r["dead_codes"] <= cfg.codebook_size
    assert rows[-1]["recon"] < rows[0]["recon"], "the reconstruction did not improve"
    assert (tiny_vq / "loss.png").stat().st_size > 0 and (tiny_vq / "judge.onnx").is_file()

    vq = Emu3VQVAE.from_pretrained(tiny_vq / "vq")
    processor = Emu3ImageProcessor.from_pretrained(tiny_vq / "vq")
    assert vq.config.codebook_size == cfg.codebook_size and vq.vision_spatial_factor == 8
    assert (processor.min_pixels, processor.spatial_factor) == (cfg.image_size ** 2, 8)
    # The folder holds the trained weights, the EMA-moved codebook included.
    trained = _last_step(tiny_vq)
    for name, value in vq.state_dict().items():
        assert torch.equal(value, trained["vq." + name]), name


def test_pixels_are_prepared_and_shown_as_the_image_processor_does():
    cfg = get_vq_preset("tiny")
    processor = image_processor(cfg)
    images = vq_images(cfg, "val", 0, 3)
    ours = to_pixels(images, processor)
    theirs = processor(list(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    shown = np.stack([np.asarray(im) for im in processor.postprocess(ours, return_tensors="PIL.Image.Image")
                      ["pixel_values"]])
    # The runtime's arithmetic, within 1/255 of the processor's (as tests/parity checks the runtime)
    assert np.abs(to_images(ours, processor).astype(int) - shown).max() <= 1
    assert np.abs(to_images(ours, processor).astype(int) - images).max() <= 1


def test_training_path_codes_and_images_are_the_class_own(tiny_vq):
    """encode/decode (the straight-through path) compute what Emu3VQVAE.encode and .decode
    do, which is what the exporter traces."""
    from transformers import Emu3VQVAE

    vq = Emu3VQVAE.from_pretrained(tiny_vq / "vq").eval()
    cfg = get_vq_preset("tiny")
    pixels = to_pixels(vq_images(cfg, "test", 0, 4), image_processor(cfg))
    with torch.no_grad():
        z = encode(vq, pixels)
        codes = vq.quantize(z)[:, 0]
        theirs = torch.stack(vq.encode(pixels, image_sizes=torch.tensor([pixels.shape[-2:]] * 4)).image_tokens)
        assert torch.equal(codes, theirs)
        mine = decode(vq, vq.quantize.embedding(codes).permute(0, 3, 1, 2).unsqueeze(1))
        torch.testing.assert_close(mine, vq.decode(codes), rtol=0, atol=1e-5)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    cfg = get_vq_preset("tiny")
    train_vq(cfg, tmp_path / "straight", progress=False, judge=False, log=lambda *a: None)
    train_vq(cfg, tmp_path / "resumed", progress=False, judge=False, stop_after=cfg.steps // 2, log=lambda *a: None)
    assert not (tmp_path / "resumed" / "vq").exists()
    train_vq(cfg, tmp_path / "resumed", resume=True, progress=False, judge=False, log=lambda *a: None)
    straight, resumed = _last_step(tmp_path / "straight"), _last_step(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and any(k.startswith("codebook.") for k in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert load_file(str(tmp_path / "straight" / "vq" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "resumed" / "vq" / "model.safetensors")).keys()


def test_codes_follow_their_averages_and_dead_ones_restart_at_encoder_outputs():
    torch.manual_seed(0)
    book = EMACodebook(4, 2, decay=0.5, dead_after=2)
    weight = torch.zeros(4, 2)
    z = torch.randn(8, 2)
    g = torch.Generator().manual_seed(0)
    book.start(weight, z, g)
    assert all(any(torch.equal(w, row) for row in z) for w in weight)   # every code is an encoder output
    start = weight.clone()
    codes = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])   # codes 2 and 3 never chosen
    usage = book.update(weight, z, codes, 1, g)
    assert usage == {"perplexity": pytest.approx(2.0), "codes_used": 2, "dead_codes": 0}
    # decay 0.5: (0.5 * start + 0.5 * sum of its 4 outputs) / (0.5 * 1 + 0.5 * 4)
    for code in (0, 1):
        want = 0.2 * start[code] + 0.8 * z[codes == code].mean(0)
        torch.testing.assert_close(weight[code], want, rtol=0, atol=1e-4)
    usage = book.update(weight, z, codes, 2, g)
    assert usage["dead_codes"] == 2
    assert all(any(torch.equal(w, row) for row in z) for w in weight[2:])
    assert book.last_used.tolist() == [2, 2, 2, 2] and book.cluster_size[2:].tolist() == [1.0, 1.0]


def test_eval_scores_the_reconstructions(tiny_vq, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_vq), "--family", "emu3", "--scale", "0.02", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    for key in ("reconstruction_accuracy", "judge_accuracy", "reconstruction_similarity"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["psnr"] > 0 and 1 <= metrics["perplexity"] <= metrics["codes_used"]
    assert metrics["codes_used"] + metrics["dead_codes"] == VQ_PRESETS["tiny"].codebook_size
    assert metrics["samples"] == {"objects": 4, "digits": 4, "scenes": 4}


@pytest.mark.parametrize("argv, message", [
    (["--stages", "0,2"], "emu3's stages are 0 (the VQ-VAE) and 1 (the decoder)"),
    (["--mix", "vqa=1"], "--mix is for the emu2 stages"),
    (["--preset", "huge"], "presets: tiny, small"),
    (["--resume"], "nothing to resume"),
])
def test_bad_emu3_training_requests_are_refused(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--family", "emu3", "--out", str(tmp_path / "run"), *argv])
    assert message in str(e.value)


def test_eval_without_a_vq_folder_says_what_is_missing(tmp_path):
    (tmp_path / "judge.onnx").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path), "--family", "emu3"])
    assert "vq/config.json" in str(e.value) and "--resume" in str(e.value)


def test_eval_refuses_an_unknown_task_before_exporting(tmp_path):
    for name in ("config.json", "judge.onnx"):
        (tmp_path / name).write_text("{}")   # export-hf would fail on it, after a while
    with pytest.raises(SystemExit, match="cooking"):
        main(["eval", str(tmp_path), "--family", "emu3", "--only", "vqa,cooking"])


def test_emu2_run_is_not_resumed_as_emu3(tmp_path):
    run = tmp_path / "run"
    train_vq(get_vq_preset("tiny"), run, progress=False, judge=False, stop_after=3, log=lambda *a: None)
    state = run / "steps" / "0-000003" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "family": "emu2"}))
    with pytest.raises(CheckpointError, match="holds an emu2 run"):
        train_vq(get_vq_preset("tiny"), run, resume=True, progress=False, judge=False, log=lambda *a: None)
