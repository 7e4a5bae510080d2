"""Every CLI failure is one line naming the problem; --debug shows the traceback; limits
on threads, images and output paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from PIL import Image

from emu_edge import data
from emu_edge.cli import main
from emu_edge.runtime.images import load_image


def _image(tmp_path, name="image.png"):
    path = tmp_path / name
    Image.fromarray(data.captioning("test", 1, size=16)[0].segments[0].value).save(path)
    return path


def _one_error_line(err: str, verb: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith(f"emu-edge {verb}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def bomb(tmp_path, monkeypatch):
    """A 16x16 PNG with PIL's pixel limit lowered to 100 (256 pixels is over twice that)."""
    path = _image(tmp_path, "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    return path


def test_an_image_over_the_pixel_limit_is_one_line_naming_file_size_and_limit(tiny_bundle, bomb, capsys):
    assert main(["caption", str(bomb), "--bundle", str(tiny_bundle)]) == 1
    line = _one_error_line(capsys.readouterr().err, "caption")
    assert "bomb.png" in line and "16x16" in line and "MAX_IMAGE_PIXELS = 100" in line


def test_debug_shows_the_traceback_before_or_after_the_verb(tiny_bundle, bomb):
    with pytest.raises(Image.DecompressionBombError, match="bomb.png"):
        main(["--debug", "caption", str(bomb), "--bundle", str(tiny_bundle)])
    with pytest.raises(Image.DecompressionBombError, match="bomb.png"):
        main(["caption", str(bomb), "--bundle", str(tiny_bundle), "--debug"])


def test_a_graph_that_is_not_onnx_is_one_line(tiny_bundle, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    garbage = b"this is not a protobuf" * 10
    (broken / "decoder.onnx").write_bytes(garbage)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert main(["caption", str(_image(tmp_path)), "--bundle", str(broken)]) == 1
    line = _one_error_line(capsys.readouterr().err, "caption")
    assert "decoder.onnx" in line and "re-export" in line


def test_quantize_onto_an_existing_folder_is_one_line(tiny_bundle, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["quantize", str(tiny_bundle), "--graph", "decoder=fp16", "--out", str(existing)]) == 1
    assert "already exists" in _one_error_line(capsys.readouterr().err, "quantize")


def test_generate_checks_the_output_path_before_generating(tiny_bundle, tmp_path, capsys):
    def refused(output, *expected):
        assert main(["generate", "a red circle", "-o", str(output), "--bundle", str(tiny_bundle),
                     "--steps", "2"]) == 1
        err = capsys.readouterr().err
        assert "denoising" not in err, "the image was generated before the path was checked"
        line = _one_error_line(err, "generate")
        for text in (str(output), *expected):
            assert text in line, line

    refused(tmp_path / "red.xyz", ".xyz")
    refused(tmp_path / "red", "suffix")
    refused(tmp_path, "is a folder")
    refused(tmp_path / "missing" / "dir" / "red.png", "--mkdir")
    assert not (tmp_path / "missing").exists()
    out = tmp_path / "missing" / "dir" / "red.png"
    assert main(["generate", "a red circle", "-o", str(out), "--mkdir", "--bundle", str(tiny_bundle),
                 "--steps", "2"]) == 0
    assert Image.open(out).size == (16, 16)


def test_chat_goes_on_after_a_bad_image(tiny_bundle, tmp_path, bomb, monkeypatch, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    lines = iter([f"/image {bomb}", f"/image {text}", f"/image {tmp_path / 'nope.png'}", f"/image {tmp_path}",
                  "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--bundle", str(tiny_bundle), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("emu> ") == 1, "the session ended before the message"
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and "bomb.png" in errors[0] and "notes.png" in errors[1], errors


def test_threads_beyond_the_cpu_count_are_capped_with_a_warning(tiny_bundle, tmp_path, capsys):
    many = (os.cpu_count() or 1) + 3
    assert main(["caption", str(_image(tmp_path)), "--bundle", str(tiny_bundle), "--threads", str(many),
                 "--max-new-tokens", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"emu-edge: warning: --threads {many} is more than this machine's {os.cpu_count()} CPUs; "
                        f"using {os.cpu_count()}"]
    with pytest.raises(SystemExit):
        main(["caption", "x.png", "--threads", "0"])
    assert "--threads: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_an_image_with_a_zero_side_is_refused(size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]} pixels"):
        load_image(Image.new("RGB", size))
