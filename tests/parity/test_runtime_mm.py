"""The runtime on a multimodal bundle: parity with PyTorch, loops, conversations, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from emu_edge import data
from emu_edge.runtime.decoder import ContextTooLongError, DecoderError
from emu_edge.runtime.pipeline import Pipeline
from emu_edge.training import generate as reference


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle)


@pytest.fixture(scope="module", params=["gqa", "standard"])
def any_pipe(request):
    """The runtime over each decoder attention variant."""
    return Pipeline.load(request.getfixturevalue({"gqa": "tiny_bundle", "standard": "tiny_bundle_standard"}[request.param]))


def _prompt(sample):
    segs = [(s.kind, s.value) for s in sample.segments]
    last = max(i for i, (k, _) in enumerate(segs) if k == "answer")
    return segs[:last]


def _items(segments):
    return [v if k != "frames" else list(v) for k, v in segments]


@pytest.mark.parametrize("task", ["captioning", "vqa", "video", "fewshot", "digits"])
def test_greedy_text_matches_pytorch(any_pipe, tiny_model, task):
    pipe = any_pipe
    model, tokenizer, cfg = tiny_model
    for sample in getattr(data, task)("test", 3, size=cfg.image_size):
        segs = _prompt(sample)
        enc = pipe.builder.encode(sample.task, segs, generate="text")
        want = reference.greedy_ids(model, enc, max_new_tokens=12)
        template = "chat" if sample.task in ("vqa", "video", "fewshot") else "plain"
        rows, visual = [enc.ids], pipe.encode_visuals(enc.visuals)
        got = pipe.generate(rows, 12, pipe_sampler(), pipe.manifest.model.eos_ids(), visual)[0]
        eos = pipe.manifest.model.eos_ids()
        assert [t for t in got if t not in eos] == want
        # The user-facing path builds the same prompt from plain items.
        text = pipe.generate_text(_items(segs), max_new_tokens=12, template=template)
        assert text == tokenizer.decode(want, skip_special_tokens=True).strip()


def pipe_sampler():
    from emu_edge.runtime.sampling import Sampler, SamplingConfig

    return Sampler(SamplingConfig())


def test_text_to_image_matches_pytorch_within_2_levels(any_pipe, tiny_model):
    pipe = any_pipe
    model, _, cfg = tiny_model
    prompts = ["a red circle", "a large blue square"]
    got = [np.asarray(pipe.generate_image([p], steps=8, guidance=3.0, seed=3)) for p in prompts]
    cond = torch.stack([reference.regress(model, pipe.builder, "text_to_image", [("text", p)]) for p in prompts])
    reg = pipe.regress([pipe.encode_items([p], "image") for p in prompts])
    np.testing.assert_allclose(reg, cond.numpy(), atol=1e-4)
    for i, p in enumerate(prompts):
        want = reference.sample_images(model, cond[i:i + 1], steps=8, guidance=3.0, seed=3)[0]
        assert np.abs(got[i].astype(int) - want.astype(int)).max() <= 2, p


def test_bound_regression_step_equals_embedding_then_step(pipe):
    """step_regressed (the decoder reading its own bound output as image_embeds) gives
    what the plain path gives: extend by the <image> ids with the last regressed rows;
    a batch of two prompts of different lengths, so each row continues from its own end."""
    encoded = [pipe.encode_items([p], "image") for p in ("a red circle", "a large blue square on the left")]
    assert len({len(e.ids) for e in encoded}) == 2
    sessions = [pipe.session(2, 128) for _ in range(2)]
    with pytest.raises(DecoderError, match="prefill first"):
        sessions[0].step_regressed()
    plain, bound = (s.prefill([e.ids for e in encoded]) for s in sessions)
    ids = np.full((2, 1), pipe.manifest.model.prompt.tokens["<image>"], np.int64)
    for _ in range(5):
        plain = sessions[0].extend(ids, plain.regressed)
        bound = sessions[1].step_regressed()
        np.testing.assert_array_equal(bound.regressed, plain.regressed)
        np.testing.assert_array_equal(bound.logits, plain.logits)


def test_batched_generation_equals_one_at_a_time(pipe):
    # Row 0 of a batch draws the first noise of the seed's stream, as a batch of one does.
    images = pipe.generate_image_batch([["a red circle"], ["a green triangle"]], steps=4, seed=5)
    alone = pipe.generate_image(["a red circle"], steps=4, seed=5)
    assert np.abs(np.asarray(images[0], int) - np.asarray(alone, int)).max() <= 1
    samples = data.captioning("test", 3, size=16)
    batch = pipe.generate_text_batch([[s.segments[0].value] for s in samples], max_new_tokens=8)
    assert batch == [pipe.generate_text([s.segments[0].value], max_new_tokens=8) for s in samples]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_autoencode_matches_pytorch_for_each_scheduler(pipe, tiny_model, scheduler):
    model, _, cfg = tiny_model
    image = data.captioning("test", 1, size=cfg.image_size)[0].segments[0].value
    got = np.asarray(pipe.autoencode(image, steps=6, scheduler=scheduler, seed=1))
    want = reference.autoencode(model, image[None], steps=6, seed=1, scheduler=scheduler)[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_subject_driven_generation_runs(pipe):
    source = data.subject("test", 1, size=16)[0].segments[0].value
    image = pipe.generate_image([source, "make it blue"], steps=3)
    assert image.size == (16, 16) and image.mode == "RGB"


def test_stream_text_concatenates_to_generate_text(pipe):
    image = data.vqa("test", 1, size=16)[0].segments[0].value
    items = [image, "what colour is the circle?"]
    assert "".join(pipe.stream_text(items, max_new_tokens=10)).strip() == pipe.generate_text(items, max_new_tokens=10)


def test_conversation_prefills_only_the_new_turn(pipe):
    sample = data.chat("test", 1, size=16)[0]
    image = sample.segments[0].value
    questions = [s.value for s in sample.segments if s.kind == "text"]
    chat = pipe.conversation()
    first = chat.ask([image, questions[0]], max_new_tokens=6)
    cached = len(chat.history)
    second = chat.ask([questions[1]], max_new_tokens=6)
    turn_ids = pipe.encode_items([questions[1]], "text", "chat").ids[1:]  # no second <s>
    # The cache grew by the previous answer's end (</s>), the new turn and the answer fed back.
    assert chat.session.lengths[0] == len(chat.history)
    assert len(chat.history) - cached >= len(turn_ids)
    # Same answer as a fresh run over the whole conversation written out.
    enc = pipe.builder.encode("chat", [("image", image), ("text", questions[0]), ("answer", first),
                                       ("text", questions[1])], generate="text")
    fresh = pipe.generate([enc.ids], 6, pipe_sampler(), pipe.manifest.model.eos_ids(),
                          pipe.encode_visuals(enc.visuals))[0]
    eos = pipe.manifest.model.eos_ids()
    assert pipe.tokenizer.decode([t for t in fresh if t not in eos], skip_special_tokens=True).strip() == second


def test_runtime_runs_with_torch_blocked(tiny_bundle):
    code = f"""
import sys
sys.modules['torch'] = None
from emu_edge.runtime.pipeline import Pipeline
import numpy as np
pipe = Pipeline.load({str(tiny_bundle)!r})
print(pipe.generate_text([np.zeros((16, 16, 3), np.uint8)], max_new_tokens=4))
print(pipe.generate_image(['a red circle'], steps=2).size)
assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(16, 16)" in result.stdout


# -- bad input ---------------------------------------------------------------------------

def test_unreadable_image_is_named(pipe, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        pipe.generate_text([bad])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe.generate_text([tmp_path / "missing.png"])


def test_any_image_mode_and_size_is_converted(pipe):
    rgba = Image.new("RGBA", (50, 30), (255, 0, 0, 128))
    grey = Image.new("L", (7, 7), 200)
    assert isinstance(pipe.generate_text([rgba], max_new_tokens=3), str)
    assert isinstance(pipe.generate_text([grey, "what colour is it?"], max_new_tokens=3), str)


def test_empty_prompt(pipe):
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.generate_text(["   "])
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.generate_image([""])


def test_prompt_longer_than_the_context_names_the_limit(pipe):
    long = " ".join(["red circle"] * 400)
    with pytest.raises(ContextTooLongError, match="max_length 256"):
        pipe.generate_text([long], max_new_tokens=4)
    image = np.zeros((16, 16, 3), np.uint8)
    # Asked for, truncation drops the oldest items until the prompt fits.
    assert isinstance(pipe.generate_text([long, image, "what colour?"], max_new_tokens=4, truncate=True), str)


def test_image_placeholder_is_never_a_text_token(tiny_bundle, monkeypatch):
    pipe = Pipeline.load(tiny_bundle)  # its own: the logits are rigged below
    image_id = pipe.manifest.model.prompt.tokens["<image>"]
    from emu_edge.runtime import text

    with pytest.raises(ValueError, match=f"placeholder token.*id {image_id}"):
        pipe.generate_ids([1, image_id, 9], 2)
    with pytest.raises(ValueError, match=f"placeholder token.*id {image_id}"):
        pipe.session(1).step([image_id])
    # A model that ranks <image> first at every step: the text loop picks around it
    # instead of feeding back a placeholder it has no embedding for.
    for name in ("prefill", "decode_step"):
        def rigged(*args, _real=getattr(text, name), **kwargs):
            out = _real(*args, **kwargs)
            out.logits[:, image_id] = out.logits.max() + 10
            return out
        monkeypatch.setattr(text, name, rigged)
    for sampling in ({}, {"do_sample": True, "seed": 0}):
        new = pipe.generate_ids([1, 9, 10], 6, ignore_eos=True, **sampling)
        assert len(new) == 6 and image_id not in new


@pytest.mark.parametrize("kwargs, named", [
    (dict(temperature=0, do_sample=True), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_sampling_parameters_are_named(pipe, kwargs, named):
    with pytest.raises(ValueError, match=named):
        pipe.generate_text([np.zeros((16, 16, 3), np.uint8)], **kwargs)


@pytest.mark.parametrize("kwargs, named", [
    (dict(scheduler="plms"), "ddim"),
    (dict(steps=0), "num_inference_steps"),
    (dict(guidance=-1.0), "guidance"),
    (dict(seed=-3), "seed"),
])
def test_invalid_image_parameters_are_named(pipe, kwargs, named):
    with pytest.raises(ValueError, match=named):
        pipe.generate_image(["a red circle"], **kwargs)


def test_text_only_bundle_refuses_images(tmp_path, tiny_checkpoint, capsys):
    from emu_edge.cli import main

    out = tmp_path / "text"
    assert main(["export-hf", "--llm", str(tiny_checkpoint / "llm"), "--out", str(out)]) == 0
    pipe = Pipeline.load(out)
    assert pipe.manifest.model.family == "llm"
    with pytest.raises(AttributeError, match="family 'llm', which has no 'generate_image'.*emu2 bundle"):
        pipe.generate_image(["a red circle"])
    session = pipe.session(1)
    session.prefill([[1, 2, 3]])
    with pytest.raises(DecoderError, match="no regression head"):
        session.step_regressed()
    capsys.readouterr()
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--bundle", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("emu-edge generate: error: ") and "family 'llm'" in err and "\n" not in err


def test_without_onnxruntime_the_error_names_the_extra(tiny_bundle):
    code = f"""
import sys
sys.modules['onnxruntime'] = None
sys.modules['torch'] = None
import emu_edge.runtime.pipeline as p   # importing works; using a graph says what to install
try:
    p.Pipeline.load({str(tiny_bundle)!r})
except Exception as e:
    print(type(e).__name__, e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install 'emu-edge[cpu]'" in result.stdout
