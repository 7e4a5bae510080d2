"""The runtime's command line on an emu3 bundle: caption, ask and generate (visual tokens),
each family's generate options refused on the other, and interrupted generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emu_edge.cli import main


def _image(tmp_path, size=(12, 10)):
    path = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_caption_and_ask(emu3_bundle, tmp_path, capsys):
    image = _image(tmp_path)
    assert main(["caption", str(image), "--bundle", str(emu3_bundle), "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == str(image) and isinstance(out["text"], str)
    assert main(["ask", str(image), "w5 w6", "--bundle", str(emu3_bundle), "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("bundle", ["emu3", "emu2"])
def test_a_system_prompt_without_a_layout_is_a_one_line_error(emu3_bundle, tiny_bundle, tmp_path, capsys, bundle):
    path = emu3_bundle if bundle == "emu3" else tiny_bundle   # neither has a system slot
    assert main(["ask", str(_image(tmp_path)), "w5", "--bundle", str(path), "--system", "w9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "system prompt" in err


def test_generate_takes_the_emu3_options(emu3_bundle, tmp_path, capsys):
    from emu_edge.runtime.pipeline import Pipeline

    out = tmp_path / "a.png"
    assert main(["generate", "w5 w6", "-o", str(out), "--bundle", str(emu3_bundle), "--height", "8", "--width", "6",
                 "--guidance", "2.5", "--negative-prompt", "w9", "--top-k", "1", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "image tokens [" in err and "17/17" in err   # 4 rows of 3 codes + EOL, then EOF
    assert "KV cache for 8x6: 2 row(s)" in err          # the prompt and the negative prompt
    assert Image.open(out).size == (6, 8)
    # what the Python API gives for the same settings
    pipe = Pipeline.load(emu3_bundle, threads=1)
    want = pipe.generate_image("w5 w6", height=8, width=6, guidance=2.5, negative_prompt="w9", top_k=1, seed=3)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]   # no temporary file left

    # defaults: the bundle's image area, top-k and guidance
    assert main(["generate", "w5", "-o", str(tmp_path / "b.png"), "--bundle", str(emu3_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == str(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").size == (6, 6)


@pytest.mark.parametrize("option", [["--steps", "3"], ["--scheduler", "euler"], ["--image", "IMAGE"]])
def test_emu2_options_are_refused_on_emu3(emu3_bundle, tmp_path, capsys, option):
    option = [str(_image(tmp_path)) if o == "IMAGE" else o for o in option]
    out = tmp_path / "x.png"
    assert main(["generate", "w5", "-o", str(out), "--bundle", str(emu3_bundle), *option]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{option[0]} is not an option of emu3 bundles" in err
    assert "--height" in err and not out.exists()


def test_emu3_options_are_refused_on_emu2(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "-o", str(out), "--bundle", str(tiny_bundle), "--height", "16",
                 "--top-k", "4", "--negative-prompt", "blue"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--height, --negative-prompt, --top-k are not options of emu2 bundles" in err and "--steps" in err
    assert not out.exists()


@pytest.mark.parametrize("bundle", ["emu3", "emu2"])
def test_ctrl_c_leaves_no_output_file(emu3_bundle, tiny_bundle, tmp_path, monkeypatch, bundle):
    """Interrupted while generating, or while writing the file: nothing at -o."""
    from emu_edge.runtime import cli as runtime_cli

    path = emu3_bundle if bundle == "emu3" else tiny_bundle
    out = tmp_path / "out.png"
    extra = ["--height", "4", "--width", "4"] if bundle == "emu3" else ["--steps", "2"]

    def interrupted_bar(label):
        def progress(done, total):
            if done == 2:
                raise KeyboardInterrupt
        return progress

    monkeypatch.setattr(runtime_cli, "progress_bar", interrupted_bar)
    assert main(["generate", "w5", "-o", str(out), "--bundle", str(path), *extra]) == 130
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()

    def interrupted_save(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    assert main(["generate", "w5", "-o", str(out), "--bundle", str(path), *extra]) == 130
    assert list(tmp_path.iterdir()) == []
