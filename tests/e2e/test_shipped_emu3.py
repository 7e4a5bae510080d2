"""The shipped Emu3-style model, models/emu3-edge-small: transformers' own classes load it
and draw its greedy image token for token as our bundle does, and what it draws for "a red
circle" the shipped Emu2-style model reads back as a red circle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_models import reference_tokens
from emu_edge.cli import main
from emu_edge.runtime.shipped import shipped_checkpoint

SEEDS = 8


@pytest.fixture(scope="module")
def emu3_shipped(tmp_path_factory):
    """(the folder, its bundle exported fresh)."""
    folder = shipped_checkpoint("emu3")
    out = tmp_path_factory.mktemp("bundles") / "emu3-edge-small"
    assert main(["export-hf", str(folder), "--out", str(out)]) == 0
    return folder, out


def test_transformers_draws_the_shipped_models_greedy_image_as_our_bundle_does(emu3_shipped):
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from emu_edge.runtime.pipeline import Pipeline

    folder, bundle = emu3_shipped
    pipe = Pipeline.load(bundle, threads=1)
    model = Emu3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    guidance = json.loads((folder / "generation_config.json").read_text())["guidance_scale"]
    rows, cols = pipe.family.image_codes_size(None, None)
    # transformers' processor writes the same generation prompt as ours
    processor = Emu3Processor.from_pretrained(folder)
    inputs = processor(text=["a red circle"], return_for_image_generation=True,
                       image_area=rows * cols * pipe.family.spec.spatial_factor ** 2, return_tensors="np")
    assert inputs["input_ids"][0].tolist() == pipe.family.image_prompt("a red circle", rows, cols)

    ours = pipe.image_ids(["a red circle"], guidance=guidance, top_k=1)[0]
    theirs = reference_tokens(pipe, model, "a red circle", rows, cols, guidance=guidance, negative="")
    np.testing.assert_array_equal(ours, theirs[:len(ours)])


def test_a_red_circle_drawn_by_the_emu3_model_is_read_back_by_the_emu2_model(emu3_shipped, shipped_bundle,
                                                                             tmp_path, capsys):
    _, bundle = emu3_shipped
    read = []
    for seed in range(SEEDS):
        image = tmp_path / f"red_circle_{seed}.png"
        assert main(["generate", "a red circle", "-o", str(image), "--bundle", str(bundle), "--seed", str(seed)]) == 0
        capsys.readouterr()
        assert main(["caption", str(image), "--bundle", str(shipped_bundle)]) == 0
        read.append(capsys.readouterr().out.strip())
    hits = sum(caption.endswith("red circle") for caption in read)
    assert hits > SEEDS // 2, read
