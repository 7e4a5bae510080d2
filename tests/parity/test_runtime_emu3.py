"""The emu3 runtime family against transformers' Emu3ForConditionalGeneration: image tokens
under the row constraint (greedy, with and without classifier-free guidance), the decoded
image, and plain text prompts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tiny_models import EMU3_CHAT_TEMPLATE, EMU3_PRESETS, make_emu3_folder, reference_tokens
from emu_edge.cli import main as cli_main
from emu_edge.runtime.decoder import ContextTooLongError
from emu_edge.runtime.pipeline import Pipeline


def PROCESSOR(folder=None):
    """The image processor settings the test folders save (and transformers' reference uses)."""
    from transformers import Emu3ImageProcessor

    processor = Emu3ImageProcessor(min_pixels=8 * 8, max_pixels=16 * 16, spatial_factor=8)
    if folder is not None:
        processor.save_pretrained(folder)
    return processor


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    """preset -> (Pipeline, transformers model), made on first use."""
    from transformers import Emu3ForConditionalGeneration

    made = {}

    def get(preset: str):
        if preset not in made:
            root = tmp_path_factory.mktemp(f"emu3_rt_{preset}")
            folder = make_emu3_folder(root / "folder", preset)
            # small images, so an image prompt fits the tiny cache (the defaults make 512^2+)
            PROCESSOR(folder)
            assert cli_main(["export-hf", str(folder), "--out", str(root / "bundle"), "--max-length", "128"]) == 0
            model = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
            made[preset] = Pipeline.load(root / "bundle", threads=1), model
        return made[preset]

    return get


@pytest.mark.parametrize("preset,rows,cols", [("f2", 4, 4), ("f2", 3, 5), ("f4", 4, 4)])
def test_greedy_image_equals_transformers(emu3, preset, rows, cols):
    from transformers import Emu3ImageProcessor

    pipe, model = emu3(preset)
    f = pipe.manifest.model.emu3.spatial_factor
    ours = pipe.image_ids(["w5 w6 w7"], height=rows * f, width=cols * f, guidance=1, top_k=1)[0]
    theirs = reference_tokens(pipe, model, "w5 w6 w7", rows, cols)
    np.testing.assert_array_equal(ours, theirs[:len(ours)])
    # the codes are not all one id: the comparison says something
    assert len(set(ours.tolist())) > 3

    image = pipe.generate_image("w5 w6 w7", height=rows * f, width=cols * f, guidance=1, top_k=1)
    with torch.no_grad():
        pixels = model.decode_image_tokens(image_tokens=torch.from_numpy(theirs)[None], height=rows, width=cols)
    want = Emu3ImageProcessor().postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    want = want[0] if isinstance(want, list) else want
    assert image.size == want.size == (cols * f, rows * f)
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1   # within 1/255


@pytest.mark.parametrize("preset,negative", [("f2", None), ("f2", "w40 w41"), ("f4", None)])
def test_guided_greedy_tokens_equal_transformers(emu3, preset, negative):
    pipe, model = emu3(preset)
    f = pipe.manifest.model.emu3.spatial_factor
    ours = pipe.image_ids(["w9 w10"], height=4 * f, width=4 * f, guidance=3.0, negative_prompt=negative, top_k=1)[0]
    theirs = reference_tokens(pipe, model, "w9 w10", 4, 4, guidance=3.0, negative=negative)
    np.testing.assert_array_equal(ours, theirs[:len(ours)])
    # guidance changes the image here: otherwise the CFG path would go untested
    plain = pipe.image_ids(["w9 w10"], height=4 * f, width=4 * f, guidance=1, top_k=1)[0]
    assert not np.array_equal(ours, plain)


def test_the_folders_negative_prompt_is_the_bundles_default(emu3, tmp_path):
    import json

    pipe, model = emu3("f2")
    folder = tmp_path / "folder"
    make_emu3_folder(folder, "f2")
    PROCESSOR(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "negative_prompt": "w40 w41"}))
    assert cli_main(["export-hf", str(folder), "--out", str(tmp_path / "bundle"), "--max-length", "128"]) == 0
    own = Pipeline.load(tmp_path / "bundle", threads=1)
    assert own.manifest.model.generation["negative_prompt"] == "w40 w41"
    ours = own.image_ids(["w9 w10"], height=8, width=8, guidance=3.0, top_k=1)[0]
    theirs = reference_tokens(pipe, model, "w9 w10", 4, 4, guidance=3.0, negative="w40 w41")
    np.testing.assert_array_equal(ours, theirs[:len(ours)])


def test_batch_and_threads_give_what_each_prompt_gets_alone(emu3):
    pipe, _ = emu3("f2")
    prompts = ["w5 w6", "w9 w10 w11 w12", "w20"]
    alone = [pipe.image_ids([p], height=8, width=8, guidance=2.0, top_k=1)[0] for p in prompts]
    batch = pipe.image_ids(prompts, height=8, width=8, guidance=2.0, top_k=1)
    np.testing.assert_array_equal(batch, np.stack(alone))
    images = pipe.generate_image_batch(prompts, height=8, width=8, guidance=2.0, top_k=1)
    assert [im.size for im in images] == [(8, 8)] * 3

    results: dict[int, np.ndarray] = {}

    def run(i):
        results[i] = pipe.image_ids([prompts[i]], height=8, width=8, guidance=2.0, top_k=1)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        np.testing.assert_array_equal(results[i], alone[i])


def test_sampled_images_keep_the_row_structure_and_repeat_by_seed(emu3):
    pipe, _ = emu3("f2")
    spec = pipe.manifest.model.emu3
    steps = []
    ids = pipe.image_ids(["w5"], height=6, width=8, seed=4, progress=lambda i, n: steps.append((i, n)))[0]
    assert steps[-1] == (len(ids), len(ids)) == (3 * 5 + 1, 16)
    grid = ids[:-1].reshape(3, 5)
    assert np.all(grid[:, 4] == spec.eol_token_id) and ids[-1] == spec.eof_token_id
    assert np.all(np.isin(grid[:, :4], list(spec.visual_ids())))
    np.testing.assert_array_equal(ids, pipe.image_ids(["w5"], height=6, width=8, seed=4)[0])
    # requests batched with a seed each (the server's image_requests) draw what they draw alone
    alone = [pipe.image_request(p, n=n, width=8, height=6, seed=seed) for p, n, seed in (("w5", 2, 4), ("w9", 1, 7))]
    together = pipe.image_requests([("w5", [], 2, 4), ("w9", [], 1, 7)], width=8, height=6)
    assert [len(images) for images in together] == [2, 1]
    for got, want in zip(together, alone):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert not np.array_equal(np.asarray(together[0][0]), np.asarray(together[0][1]))   # n images differ


def test_refusals_name_the_valid_sizes(emu3):
    pipe, _ = emu3("f4")
    with pytest.raises(ValueError, match="height 10 is not a multiple of 4.*8 or 12"):
        pipe.generate_image("w5", height=10, width=8)
    with pytest.raises(ContextTooLongError, match="beyond max_length 128.*Largest that fits: 52x32.*40x40 square"):
        pipe.generate_image("w5", height=64, width=32)
    with pytest.raises(ValueError, match="guidance"):
        pipe.generate_image("w5", height=8, width=8, guidance=-1)
    with pytest.raises(ValueError, match="not video clips"):
        pipe.generate_text([[np.zeros((8, 8, 3), np.uint8)] * 2, "w5"])


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_plain_text_greedy_equals_transformers(emu3, preset):
    pipe, model = emu3(preset)
    ids = pipe.family.text_prompts(["w5 w6 w7 w8"], "auto", False, 12, None)[0][0]
    assert ids[0] == pipe.manifest.model.bos_token_id and ids.count(ids[0]) == 1
    ours = pipe.generate_ids(ids, max_new_tokens=12)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                             guidance_scale=1.0)
    assert ours == out[0, len(ids):].tolist()
    assert isinstance(pipe.generate_text("w5 w6 w7 w8", max_new_tokens=4), str)


def reference_pixels(image):
    out = PROCESSOR()(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_sizes"]


@pytest.mark.parametrize("preset", sorted(EMU3_PRESETS))
def test_image_prompt_greedy_text_equals_transformers(emu3, preset):
    """An image then a question: the processor's pixels, the image block's ids, and the
    greedy answer against transformers' generate with pixel_values (its placeholders
    filled with the VQ tokens' embeddings)."""
    from PIL import Image

    pipe, model = emu3(preset)
    spec = pipe.manifest.model.emu3
    image = Image.fromarray((np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8))
    pixel_values, image_sizes = reference_pixels(image)
    np.testing.assert_allclose(pipe.family.image_pixels(image), pixel_values.numpy(), atol=1e-5, rtol=0)

    rows = pipe.family.text_prompts([[image, "w5 w6"]], "auto", False, 8, None)[0]
    ours = rows[0]
    h, w = (int(v) // spec.spatial_factor for v in image_sizes[0])
    prompt = [pipe.manifest.model.bos_token_id, spec.boi_token_id] + pipe.family._encode(f"{h}*{w}")
    prompt += [spec.image_wrapper_token_id] + [spec.image_token_id] * (h * (w + 1))
    prompt += [spec.eof_token_id, spec.eoi_token_id] + pipe.family._encode("w5 w6")
    with torch.no_grad():
        image_ids = model.model.get_image_tokens(pixel_values, image_sizes).tolist()
    filled = list(prompt)
    first = prompt.index(spec.image_token_id)
    filled[first:first + len(image_ids)] = image_ids
    assert ours == filled
    assert len(set(image_ids)) > 3   # codes that say something

    got = pipe.generate_ids(ours, max_new_tokens=8)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                             image_sizes=image_sizes, do_sample=False, max_new_tokens=8, guidance_scale=1.0)
    assert got == out[0, len(prompt):].tolist()

    chat = pipe.conversation()
    assert chat.ask([image, "w5 w6"], max_new_tokens=8) == pipe.generate_text([image, "w5 w6"], max_new_tokens=8)


def test_image_memory_is_stated_before_allocation_and_checked(emu3, monkeypatch):
    """image_memory says what image_ids allocates (rows x positions x the KV layout) before
    it runs; the session it borrows is exactly that long, not the bundle's max_length; and
    a cache that would not fit is refused naming the image, before anything is allocated."""
    from emu_edge.runtime import decoder
    from emu_edge.runtime.decoder import DecoderError
    from emu_edge.runtime.families import emu3 as family

    pipe, _ = emu3("f2")
    kv = pipe.manifest.model.kv
    memory = pipe.image_memory(["w5 w6", "w7"], height=8, width=6, guidance=2.0, negative_prompt="w9")
    prompt = max(len(pipe.image_prompt(p, 4, 3)) for p in ("w5 w6", "w7", "w9"))
    assert (memory.rows, memory.positions) == (4, prompt + 4 * 4)   # 4 rows of 3 codes + EOL fed back
    assert memory.kv_bytes == 2 * kv.num_layers * 4 * kv.num_kv_heads * memory.positions * kv.head_dim * 4
    assert "8x6: 4 row(s)" in str(memory)
    assert pipe.image_memory(["w5"], height=8, width=6, guidance=1.0).rows == 1
    made = []
    monkeypatch.setattr(decoder.KVCache, "_check_memory", lambda cache: made.append(cache.nbytes))
    pipe.image_ids(["w5 w6", "w7"], height=8, width=6, guidance=2.0, negative_prompt="w9", top_k=1)
    assert made == [memory.kv_bytes] and memory.positions < pipe.max_length
    monkeypatch.setattr(family, "available_memory_bytes", lambda: memory.kv_bytes - 1)
    with pytest.raises(DecoderError, match="KV cache for 8x6: 4 row.*smaller image"):
        pipe.image_ids(["w5 w6", "w3"], height=8, width=6, guidance=2.0, negative_prompt="w9", top_k=1)


def test_an_image_too_large_for_the_cache_is_refused_before_encoding(emu3):
    from PIL import Image

    pipe, _ = emu3("f2")
    short = Pipeline.load(pipe.bundle, threads=1, max_length=30)
    # 30x20 pixels -> 16x8 (the processor's max 256 pixels) -> 4 x (8 + EOL) tokens
    with pytest.raises(ContextTooLongError, match="resized to 16x8 .*36 image tokens: beyond max_length 30"):
        short.generate_text([Image.new("RGB", (30, 20)), "w5"], max_new_tokens=2)


# -- the folder's chat template, rendered into the manifest's prompt layout ---------------


@pytest.fixture(scope="module")
def emu3_chat(tmp_path_factory):
    """(Pipeline, transformers model, tokenizer with the template) of a folder whose chat
    template is in the published Emu3-Chat form."""
    from transformers import Emu3ForConditionalGeneration, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("emu3_chat")
    folder = make_emu3_folder(root / "folder", "f2", chat_template=EMU3_CHAT_TEMPLATE)
    PROCESSOR(folder)
    assert cli_main(["export-hf", str(folder), "--out", str(root / "bundle"), "--max-length", "256"]) == 0
    model = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                  chat_template=(folder / "chat_template.jinja").read_text())
    return Pipeline.load(root / "bundle", threads=1), model, tok


def reference_chat_ids(pipe, model, tok, turns, system, images):
    """BOS (the processor writes it) + the tokenizer's ids of apply_chat_template's text,
    each <image> expanded as Emu3Processor does, its placeholders filled with the image's
    VQ tokens; and the unfilled ids with the pixels, for transformers' generate."""
    spec = pipe.manifest.model.emu3
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for items, answer in turns:
        messages.append({"role": "user", "content": [{"type": "image"} if not isinstance(i, str) else
                                                     {"type": "text", "text": i} for i in items]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pixels = sizes = None
    image_ids = []
    if images:
        pixels, sizes = reference_pixels(images[0])
        for image in images[1:]:
            p, s = reference_pixels(image)
            assert s.tolist() == sizes.tolist()
            pixels, sizes = torch.cat([pixels, p]), torch.cat([sizes, s])
        blocks = []
        for size in sizes.tolist():
            h, w = (int(v) // spec.spatial_factor for v in size)
            blocks.append(f"<|image start|>{h}*{w}<|image token|>" + "<image>" * (h * (w + 1))
                          + "<|extra_201|><|image end|>")
        pieces = rendered.split("<image>")
        assert len(pieces) == len(blocks) + 1
        rendered = pieces[0] + "".join(b + p for b, p in zip(blocks, pieces[1:]))
        with torch.no_grad():
            image_ids = model.model.get_image_tokens(pixels, sizes).tolist()
    prompt = [pipe.manifest.model.bos_token_id] + tok(rendered, add_special_tokens=False)["input_ids"]
    filled = list(prompt)
    positions = [i for i, t in enumerate(prompt) if t == spec.image_token_id]
    flat = [t for ids in image_ids for t in ids] if image_ids and isinstance(image_ids[0], list) else image_ids
    assert len(positions) == len(flat)
    for i, t in zip(positions, flat):
        filled[i] = t
    return filled, prompt, pixels, sizes


def test_chat_template_becomes_the_prompt_layout(emu3_chat):
    pipe, _, _ = emu3_chat
    layout = pipe.manifest.model.prompt
    assert layout is not None and pipe.manifest.model.source["chat_template"] == "chat_template.jinja"
    assert layout.user == [{"text": "USER: "}] and layout.assistant == [{"text": "ASSISTANT:"}]
    assert layout.answer == [{"text": "ASSISTANT: "}] and layout.end == [{"text": " "}]
    assert layout.text_suffix == " " and layout.image == ["<image>"] and layout.images_first
    assert layout.system == [{"slot": "system"}, {"text": " "}]


@pytest.mark.parametrize("system", [None, "w9 w10"])
@pytest.mark.parametrize("n_turns", [1, 2, 3])
def test_chat_prompts_equal_apply_chat_template(emu3_chat, n_turns, system):
    """1-3 turns, earlier ones with their answers, with and without a system prompt (none
    is added when the caller gives none): our ids equal the tokenizer's ids of
    apply_chat_template's text, with each image block where the processor puts it."""
    from PIL import Image

    pipe, model, tok = emu3_chat
    image = Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8))
    # the second turn's image comes after a text: the template writes a turn's images first
    all_turns = [([image, "w5 w6"], "w7 w8"), (["w11", image, "w12 w13"], "w14"), (["w15"], None)]
    turns = all_turns[:n_turns - 1] + [(all_turns[n_turns - 1][0], None)]
    ours = pipe.family.chat_ids(turns, system=system)
    images = [i for items, _ in turns for i in items if not isinstance(i, str)]
    want, _, _, _ = reference_chat_ids(pipe, model, tok, turns, system, images)
    assert ours == want
    if n_turns == 1:
        assert pipe.family.text_prompts([turns[0][0]], "auto", False, 8, None, system)[0][0] == want


def test_chat_layout_greedy_text_equals_transformers(emu3_chat):
    """One image+text prompt through the layout: transformers' greedy generate on the
    template's prompt gives our answer."""
    from PIL import Image

    pipe, model, tok = emu3_chat
    image = Image.fromarray((np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8))
    filled, prompt, pixels, sizes = reference_chat_ids(pipe, model, tok, [([image, "w5 w6"], None)], None, [image])
    rows = pipe.family.text_prompts([[image, "w5 w6"]], "auto", False, 8, None)[0]
    assert rows[0] == filled
    got = pipe.generate_ids(rows[0], max_new_tokens=8)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             image_sizes=sizes, do_sample=False, max_new_tokens=8, guidance_scale=1.0)
    assert got == out[0, len(prompt):].tolist()
    chat = pipe.conversation()
    assert chat.ask([image, "w5 w6"], max_new_tokens=8) == pipe.generate_text([image, "w5 w6"], max_new_tokens=8)
    assert chat.history[:len(filled)] == filled
    # a later turn continues the cache: the answer's close (no EOS: the template writes
    # none), then a user turn and the opening
    eos = pipe.manifest.model.eos_token_id
    assert pipe.family.chat_turn(["w9"], None, [eos])[0] == pipe.family._encode(" USER: w9 ASSISTANT:")
    assert isinstance(chat.ask(["w9"], max_new_tokens=2), str)
    assert eos not in chat.history


@pytest.mark.parametrize("system", [None, "w9 w10"])
def test_later_conversation_turns_equal_the_rerendered_template(emu3_chat, system):
    """A conversation's cache after answer and next turn holds what apply_chat_template
    writes for the whole conversation: answered in full (EOS sampled) or cut off
    (max_new_tokens; its last token still unfed)."""
    from PIL import Image

    pipe, model, tok = emu3_chat
    eos = pipe.manifest.model.eos_token_id
    image = Image.fromarray((np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8))
    first = pipe.family.chat_ids([([image, "w5 w6"], None)], system=system)
    assert first == pipe.family.chat_turn([image, "w5 w6"], None, None, system)[0]
    whole = pipe.family.chat_ids([([image, "w5 w6"], "w7 w8"), (["w11"], None)], system=system)
    assert whole == reference_chat_ids(pipe, model, tok, [([image, "w5 w6"], "w7 w8"), (["w11"], None)], system,
                                       [image])[0]
    w7, w8 = pipe.family._encode("w7 w8")
    assert first + [w7, w8] + pipe.family.chat_turn(["w11"], None, [eos])[0] == whole
    assert first + [w7] + pipe.family.chat_turn(["w11"], None, [w8, eos])[0] == whole

    chat = pipe.conversation(system=system)
    chat.ask([image, "w5 w6"], max_new_tokens=3)
    chat.ask(["w11"], max_new_tokens=2)
    assert chat.history[:len(first)] == first and eos not in chat.history


def test_system_prompt_per_call_and_refused_without_a_layout(emu3_chat, emu3):
    pipe, _, _ = emu3_chat
    rows = pipe.family.text_prompts([["w5"]], "auto", False, 4, None, "w9 w10")[0]
    assert rows[0] == pipe.family.chat_ids([(["w5"], None)], system="w9 w10")
    assert rows[0] != pipe.family.text_prompts([["w5"]], "auto", False, 4, None)[0][0]
    assert pipe.generate_text("w5", max_new_tokens=3, system="w9 w10") == pipe.tokenizer.decode(
        pipe.generate_ids(rows[0], max_new_tokens=3), skip_special_tokens=True).strip()
    plain, _ = emu3("f2")   # its folder has no chat template
    with pytest.raises(ValueError, match="no prompt layout"):
        plain.generate_text("w5", max_new_tokens=2, system="w9")


def test_a_default_max_new_tokens_is_capped_to_the_context(emu3):
    """The bundle's default answer length (large for Emu3's folders) is cut to what the
    context leaves: finish_reason "length"; a length the caller chose is still refused."""
    pipe, _ = emu3("f2")
    short = Pipeline.load(pipe.bundle, threads=1, max_length=20)
    (done,) = short.complete_batch(["w5 w6 w7"], ignore_eos=True)
    assert done.prompt_tokens == 4 and done.completion_tokens == 20 - 4 + 1
    assert done.finish_reason == "length"
    (alone,) = short.complete_batch(["w5 w6 w7"])
    stream = short.stream_text("w5 w6 w7")
    assert stream.finish_reason is None and "".join(stream).strip() == alone.text
    assert (stream.finish_reason, stream.completion_tokens) == (alone.finish_reason, alone.completion_tokens)
    with pytest.raises(ContextTooLongError, match="max_new_tokens"):
        short.generate_text("w5 w6 w7", max_new_tokens=18)
    (few,) = short.complete_batch(["w5 w6 w7"], max_new_tokens=2, ignore_eos=True)
    assert few.finish_reason == "length" and few.completion_tokens == 2
