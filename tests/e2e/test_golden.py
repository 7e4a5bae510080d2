"""Golden outputs of the shipped model: what a refactor must leave unchanged.

The exact greedy token ids of fixed captions, VQA answers, a few-shot and a video prompt;
the first regressed-embedding values and one generated image for a fixed seed, within a
stated tolerance (float results differ in the last bits between AMD and Intel machines,
so no hashes). The values in golden/emu-edge-small.json and .npz were written by this
module from the runtime before the families refactor:

    EMU_EDGE_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e/test_golden.py

Beside them, the decoder alone is checked against transformers' own `generate` on the
same embeddings, so a runtime change cannot pass by agreeing with training/generate.py
(which shares runtime/prompt.py with the runtime).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emu_edge import data

GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("EMU_EDGE_WRITE_GOLDEN") == "1"
# Regressed embeddings: a few ulps of float32 through 64 decode steps, far below what a
# changed graph or prompt moves them by (those move the first value by > 1e-2).
REGRESSED_ATOL = 1e-4
IMAGE_TOLERANCE = 1  # of 255: one step of rounding after the U-Net loop
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pipe(shipped_bundle):
    from emu_edge.runtime.pipeline import Pipeline

    return Pipeline.load(shipped_bundle, threads=2)


def _cases() -> dict[str, list]:
    """name -> interleaved items; fixed test-split samples, chosen once."""
    cases = {}
    for i, s in enumerate(data.captioning("test", 3)):
        cases[f"caption_{i}"] = [Image.fromarray(s.segments[0].value)]
    for i, s in enumerate(data.vqa("test", 3)):
        question = next(seg.value for seg in s.segments if seg.kind == "text")
        cases[f"vqa_{i}"] = [Image.fromarray(s.segments[0].value), question]
    shots = data.fewshot("test", 1)[0]
    cases["fewshot"] = [Image.fromarray(seg.value) if seg.kind == "image" else seg.value
                        for seg in shots.segments if seg.kind != "answer"]
    clip = data.video("test", 1)[0]
    cases["video"] = [list(clip.segments[0].value), "what is happening?"]
    return cases


def _token_ids(pipe, items, template: str = "auto", stop: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) through the Pipeline's public verbs."""
    encoded = pipe.encode_items(items, "text", template)
    stop_ids = pipe.manifest.model.eos_ids() if stop else []
    return encoded.ids, pipe.generate([encoded.ids], NEW_TOKENS, _greedy(), stop_ids,
                                      pipe.encode_visuals(encoded.visuals))[0]


def _greedy():
    from emu_edge.runtime.sampling import Sampler, SamplingConfig

    return Sampler(SamplingConfig())


def _outputs(pipe) -> tuple[dict, np.ndarray]:
    tokens = {}
    for name, items in _cases().items():
        prompt, new = _token_ids(pipe, items)
        tokens[name] = {"prompt": prompt, "new": new, "text": pipe.generate_text(items, max_new_tokens=NEW_TOKENS)}
    regressed = pipe.regress([pipe.encode_items(["a red circle"], "image")])[0]
    image = np.asarray(pipe.generate_image(["a blue square"], seed=3))
    values = {"tokens": tokens, "regressed_first16": regressed[0, :16].astype(float).tolist(),
              "regressed_last16": regressed[-1, -16:].astype(float).tolist()}
    return values, image


@pytest.fixture(scope="module")
def golden(pipe):
    if WRITE:
        values, image = _outputs(pipe)
        GOLDEN.mkdir(exist_ok=True)
        # One line per list of numbers: the file stays readable in a diff.
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                      json.dumps(values, indent=1))
        (GOLDEN / "emu-edge-small.json").write_text(text + "\n")
        np.savez_compressed(GOLDEN / "emu-edge-small.npz", image=image)
    values = json.loads((GOLDEN / "emu-edge-small.json").read_text())
    return values, np.load(GOLDEN / "emu-edge-small.npz")["image"]


@pytest.mark.parametrize("name", list(json.loads((GOLDEN / "emu-edge-small.json").read_text())["tokens"])
                         if (GOLDEN / "emu-edge-small.json").is_file() else ["caption_0"])
def test_greedy_tokens_are_the_golden_ones(pipe, golden, name):
    want = golden[0]["tokens"][name]
    prompt, new = _token_ids(pipe, _cases()[name])
    assert prompt == want["prompt"]
    assert new == want["new"]
    assert pipe.generate_text(_cases()[name], max_new_tokens=NEW_TOKENS) == want["text"]


def test_the_golden_answers_are_sensible(golden):
    # The goldens were taken from a model that reads the images: a corrupt golden file
    # (or one written from a broken runtime) would not caption the test images right.
    tokens = golden[0]["tokens"]
    truths = [s.answer for s in data.captioning("test", 3)] + [s.answer for s in data.vqa("test", 3)]
    got = [tokens[f"caption_{i}"]["text"] for i in range(3)] + [tokens[f"vqa_{i}"]["text"] for i in range(3)]
    assert sum(g == t for g, t in zip(got, truths)) >= 5


def test_regressed_embeddings_match(pipe, golden):
    regressed = pipe.regress([pipe.encode_items(["a red circle"], "image")])[0]
    np.testing.assert_allclose(regressed[0, :16], golden[0]["regressed_first16"], atol=REGRESSED_ATOL, rtol=0)
    np.testing.assert_allclose(regressed[-1, -16:], golden[0]["regressed_last16"], atol=REGRESSED_ATOL, rtol=0)


def test_generated_image_matches(pipe, golden):
    image = np.asarray(pipe.generate_image(["a blue square"], seed=3)).astype(np.int16)
    assert image.shape == golden[1].shape
    assert np.abs(image - golden[1]).max() <= IMAGE_TOLERANCE


def test_decoder_matches_transformers_generate(pipe, shipped_checkpoint_dir):
    """The shipped decoder on a multimodal prompt's embeddings (images included), greedy,
    against LlamaForCausalLM.generate on the same inputs_embeds."""
    import torch
    from transformers import LlamaForCausalLM

    from safetensors.numpy import load_file

    model = LlamaForCausalLM.from_pretrained(shipped_checkpoint_dir / "llm", dtype=torch.float32).eval()
    table = model.get_input_embeddings().weight.detach().numpy()
    proj = load_file(shipped_checkpoint_dir / "projections.safetensors")
    placeholder = pipe.manifest.model.prompt.placeholder_id
    for items in (_cases()["vqa_0"], _cases()["caption_1"], ["how many objects are there?"]):
        encoded = pipe.encode_items(items, "text", "chat")
        # The inputs the exported decoder builds inside its graph: the token table, with
        # project_up of the vision encoder's embeddings at the image token's positions.
        ids = np.asarray(encoded.ids)
        embeds = table[ids][None].copy()
        if (ids == placeholder).any():
            visual = pipe.encode_visuals(encoded.visuals)
            embeds[0, ids == placeholder] = visual @ proj["project_up.weight"].astype(np.float32).T + proj[
                "project_up.bias"].astype(np.float32)
        ours = _token_ids(pipe, items, "chat", stop=False)[1]
        with torch.no_grad():
            theirs = model.generate(inputs_embeds=torch.from_numpy(embeds), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    pad_token_id=0, eos_token_id=None)
        # With inputs_embeds only, generate returns the new tokens alone.
        assert ours == theirs[0].tolist()
