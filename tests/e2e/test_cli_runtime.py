"""The runtime's command line: caption, ask, generate, chat, demo."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from emu_edge import data
from emu_edge.cli import main


def _test_image(tmp_path, size=16):
    sample = data.captioning("test", 1, size=size)[0]
    path = tmp_path / "test_image.png"
    Image.fromarray(sample.segments[0].value).save(path)
    return path


def test_caption_and_ask_print_json(tiny_bundle, tmp_path, capsys):
    image = _test_image(tmp_path)
    assert main(["caption", str(image), "--bundle", str(tiny_bundle), "--json", "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == str(image) and isinstance(out["text"], str) and out["seconds"] > 0
    assert main(["ask", str(image), "how many shapes are there?", "--bundle", str(tiny_bundle)]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_writes_a_png(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out" / "red.png"
    assert main(["generate", "a red circle", "-o", str(out), "--mkdir", "--bundle", str(tiny_bundle), "--steps", "3",
                 "--scheduler", "euler", "--seed", "2"]) == 0
    image = Image.open(out)
    assert image.size == (16, 16) and image.mode == "RGB"
    assert "denoising" in capsys.readouterr().err  # the progress bar
    # Subject-driven: an image and an instruction.
    source = _test_image(tmp_path)
    assert main(["generate", "make it blue", "--image", str(source), "-o", str(tmp_path / "blue.png"),
                 "--bundle", str(tiny_bundle), "--steps", "2"]) == 0


def test_bad_input_exits_with_a_message(tiny_bundle, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert main(["caption", str(text), "--bundle", str(tiny_bundle)]) == 1
    assert "notes.png" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nope.png"), "--bundle", str(tiny_bundle)]) == 1
    assert "nope.png" in capsys.readouterr().err
    assert main(["caption", str(_test_image(tmp_path)), "--bundle", str(tmp_path / "no_bundle")]) == 1
    assert "no_bundle" in capsys.readouterr().err


def test_chat_keeps_the_conversation(tiny_bundle, tmp_path, monkeypatch, capsys):
    image = _test_image(tmp_path)
    lines = iter([f"/image {image}", "what is in the image?", "how many shapes are there?", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--bundle", str(tiny_bundle), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("emu> ") == 2
    assert "image 1 added" in captured.err and "new conversation" in captured.err


def test_demo_writes_images_contact_sheet_and_latency_table(tiny_bundle, emu3_bundle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--bundle", str(tiny_bundle), "--out", str(out)]) == 0
    pngs = {p.name for p in (out / "emu2").glob("*.png")}
    assert {"generate_0.png", "caption_0.png", "autoencode.png", "edit_0.png"} <= pngs
    table = (out / "latency.md").read_text()
    for task in ("caption", "ask", "generate (text-to-image)", "generate (image + text)", "autoencode"):
        assert f"| {task} |" in table
    report = json.loads((out / "demo.json").read_text())["emu2"]
    assert len(report["generate"]) >= 5 and report["caption"][0]["truth"]
    assert np.asarray(Image.open(out / "contact_sheet.png")).std() > 0
    # An emu3 bundle: the same inputs, no edits (it draws from text), the VQ round trip
    out3 = tmp_path / "demo3"
    assert main(["demo", "--bundle", str(emu3_bundle), "--out", str(out3)]) == 0
    report = json.loads((out3 / "demo.json").read_text())["emu3"]
    assert "edit" not in report and len(report["generate"]) == len(json.loads((out / "demo.json").read_text())[
        "emu2"]["generate"])
    assert report["autoencode"] and Image.open(out3 / "emu3" / "autoencode.png").size[0] > 0
    with pytest.raises(ValueError, match="--bundle"):
        main(["demo", "--bundle", str(emu3_bundle), "--model", "emu3", "--debug"])
    monkeypatch.setenv("EMU_EDGE_BUNDLE", str(tiny_bundle))
    with pytest.raises(ValueError, match="unset it"):
        main(["demo", "--model", "emu3", "--debug"])


