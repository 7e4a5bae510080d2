"""The Emu3 family: images are discrete visual tokens in the decoder's own vocabulary.

    image ──► smart resize, normalise ──► vq_encoder ──► h x w codes ──► visual ids, EOL
              per row, wrapped as the processor wraps them (ordinary ids for the text core)
    prompt ──► BOS text BOI "{h}*{w}" IMAGE_WRAPPER ──► decoder (the shared text core's
    verbs) under a per-position allowed-token mask: w visual ids then EOL, h times, then EOF
    h x w codes (ids - visual_token_start) ──► vq_decoder ──► pixels ──► PIL image

Classifier-free guidance runs the prompt and the negative prompt as two rows of ONE
batched decoder session; both rows are fed the same chosen token, and the logits are mixed
as transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor mixes them.

Written out plainly for this family alone (diffusers' one pipeline per family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from emu_edge.runtime import text
from emu_edge.runtime.decoder import ContextTooLongError, DecoderError, available_memory_bytes
from emu_edge.runtime.families import UnsupportedRequest, split_by
from emu_edge.runtime.images import load_image
from emu_edge.runtime.prompt import SYSTEM_SLOT
from emu_edge.runtime.sampling import Sampler, SamplingConfig, apply_allowed, seed_groups


@dataclass(frozen=True)
class ImageMemory:
    """The KV cache an image_ids call allocates, known before anything is allocated: one
    decoder row per image (two with guidance: the negative prompt's), each as long as the
    longest prompt plus the image tokens fed back."""

    height: int
    width: int
    rows: int
    positions: int
    kv_bytes: int
    kv_dtype: str

    def __str__(self) -> str:
        return (f"KV cache for {self.height}x{self.width}: {self.rows} row(s) x {self.positions} positions, "
                f"{self.kv_bytes / 2**20:.1f} MiB ({self.kv_dtype})")

    def check(self) -> None:
        """Refuse, naming the image, when the cache would not fit in available memory."""
        available = available_memory_bytes()
        if available is not None and self.kv_bytes > available:
            raise DecoderError(f"{self} but only {available / 2**20:.1f} MiB is available (MemAvailable); ask for a "
                               f"smaller image, fewer images at once, or guidance 1 (one row per image)")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's resize rule: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as far as those allow."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image's sides may differ by at most 200x, got {width}x{height}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


class Emu3:
    # Every id a text step samples can be fed back (visual ids are ordinary tokens here).
    banned_ids: list[int] = []

    def __init__(self, pipe):
        self.pipe = pipe
        model = pipe.manifest.model
        self.spec = model.emu3
        self.bos = [model.bos_token_id] if model.bos_token_id is not None else []
        self.layout = model.prompt          # the folder's chat template, rendered at export (or None)
        self.eos = set(model.eos_ids())
        visual = np.zeros(model.vocab_size, bool)
        visual[self.spec.visual_ids().start:self.spec.visual_ids().stop] = True
        self._visual_mask = visual   # read-only after this: shared by threads

    # -- prompts ---------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        # The processor prepends the BOS text itself and Emu3's tokenizer adds nothing, so
        # the tokenizer's own start tokens are left out here and BOS is written once.
        return self.pipe.tokenizer.encode(prompt, add_special_tokens=False).ids

    def _segments(self, items) -> list[tuple[str, object]]:
        """Interleaved items -> ("text", str) and ("image", PIL image) segments. A str is
        text; a PIL image, an [H, W, C] array or a pathlib.Path is an image."""
        if isinstance(items, (str, Path, Image.Image, np.ndarray)):
            items = [items]
        segs: list[tuple[str, object]] = []
        for item in items:
            if isinstance(item, str):
                if item.strip():
                    segs.append(("text", item))
            elif isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
                raise ValueError("emu3 reads images, not video clips: give the frames you want as single images")
            else:
                segs.append(("image", load_image(item)))
        if not segs:
            raise ValueError("empty prompt: give at least one non-empty text or image")
        return segs

    def pieces(self, items) -> list[list[int]]:
        """Items -> the ids of each, as Emu3Processor writes them: a text as the tokenizer
        encodes it, an image as its block (encode_images)."""
        segs = self._segments(items)
        images = iter(self.encode_images([v for kind, v in segs if kind == "image"]))
        return [self._encode(value) if kind == "text" else next(images) for kind, value in segs]

    def text_prompts(self, batch, template: str, truncate: bool, max_new_tokens: int, video_frames,
                     system: str | None = None):
        """Token rows for interleaved prompts (the image tokens are ordinary ids: no visual
        embeddings travel beside the rows). With the manifest's prompt layout (the folder's
        chat template), one user turn and the assistant opening, after the system prompt if
        one is given; without one, BOS then the items. truncate: the oldest items are
        dropped until the prompt fits."""
        self._check_system(system)
        budget = self.pipe.max_length - max_new_tokens + 1
        rows = []
        for items in batch:
            content = self._content(items)
            row = self._row(content, system)
            while truncate and len(row) > budget:
                if len(content) == 1:
                    raise ContextTooLongError(f"even the last item alone needs {len(row)} tokens, beyond "
                                              f"the {budget} that max_length {self.pipe.max_length} leaves")
                content = content[1:]
                row = self._row(content, system)
            rows.append(row)
        return rows, None

    def _check_system(self, system: str | None) -> None:
        if system is not None and self.layout is None:
            raise ValueError("this bundle has no prompt layout (its folder had no chat template), so no system "
                             "prompt")

    def _row(self, content, system: str | None) -> list[int]:
        if self.layout is None:
            return self.bos + self._flat(content)
        return self._layout_ids([(content, None)], system, True, start=True)

    def _flat(self, content) -> list[int]:
        return [t for kind, value in content for t in (self._encode(value) if kind == "text" else value)]

    def chat_turn(self, items, video_frames, previous: list[int] | None, system: str | None = None):
        """A conversation turn's new ids. previous: None on the first turn, else the last
        answer's unfed end (its last sampled token, with an EOS after it if it was cut off).
        With a prompt layout, as the chat template writes a conversation: the answer's
        last text token but no EOS (the template writes none), the layout's close, a user
        turn and the assistant opening; the layout's start and the system prompt on the
        first turn only. Without one: BOS on the first turn, else the EOS kept, then the
        items."""
        self._check_system(system)
        content = self._content(items)
        if self.layout is None:
            return (self.bos if previous is None else previous) + self._flat(content), None
        if previous is None:
            return self._layout_ids([(content, None)], system, True, start=True), None
        tail = [t for t in previous if t not in self.eos]
        return tail + self._layout_ids([(content, None)], None, True, start=False, after_answer=True), None

    def chat_ids(self, turns, system: str | None = None, generation: bool = True) -> list[int]:
        """The ids of a whole conversation through the prompt layout: turns are (items,
        answer or None), earlier turns with their answers; generation: end with the
        assistant opening. As the folder's chat template writes it (tokenized as one text
        between special tokens), with each image's block where its item is."""
        if self.layout is None:
            raise ValueError("this bundle has no prompt layout (its folder had no chat template)")
        return self._layout_ids([(self._content(items), answer) for items, answer in turns], system, generation,
                                start=True)

    def chat_prompt(self, turns, system: str | None = None):
        """A whole conversation as one prompt (chat_ids), -> (ids, no visuals)."""
        if self.layout is None and len(turns) > 1:
            raise ValueError("this bundle has no prompt layout (its folder had no chat template), so it takes one "
                             "user message, not a conversation")
        if self.layout is None:
            self._check_system(system)
            return self._row(self._content(turns[0][0]), None), None
        return self.chat_ids(turns, system), None

    def _content(self, items) -> list[tuple[str, object]]:
        """Items -> ("text", str) and ("image", block ids), the images encoded in one call."""
        segs = self._segments(items)
        images = iter(self.encode_images([v for kind, v in segs if kind == "image"]))
        return [(kind, value if kind == "text" else next(images)) for kind, value in segs]

    def _layout_ids(self, turns, system, generation: bool, start: bool, after_answer: bool = False) -> list[int]:
        layout = self.layout
        runs: list = []     # str (text, joined then tokenized once) or list[int]

        def add(parts, image=None):
            for part in parts:
                if isinstance(part, str):
                    runs.append(image if image is not None and part == layout.placeholder
                                else [layout.tokens[part]])
                elif part == SYSTEM_SLOT:
                    runs.append(system)
                else:
                    runs.append(part["text"])

        if start:
            add(layout.begin)
        if system is not None:
            if not layout.system:
                raise ValueError("this bundle's chat template has no system prompt")
            add(layout.system)
        if after_answer:
            add(layout.end)
        for content, answer in turns:
            add(layout.user)
            if layout.images_first:   # the template writes a turn's images before its texts
                content = [c for c in content if c[0] == "image"] + [c for c in content if c[0] != "image"]
            for kind, value in content:
                if kind == "text":
                    runs.append(value + layout.text_suffix)
                elif not layout.image:
                    raise ValueError("this bundle's chat template writes no images")
                else:
                    add(layout.image, image=value)
            add(layout.user_end)
            if answer is not None:
                add(layout.answer)
                runs.append(answer)
                add(layout.end)
        if generation:
            add(layout.assistant)
        ids: list[int] = []
        text = ""
        for run in runs + [[]]:
            if isinstance(run, str):
                text += run
                continue
            if text:
                ids += self._encode(text)
                text = ""
            ids += run
        return ids

    # -- images in -------------------------------------------------------------------------

    def image_pixels(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> [1, 3, H, W] as Emu3ImageProcessor prepares it: resized (smart
        resize, the processor's filter), x * rescale_factor, (x - mean) / std."""
        s = self.spec
        height, width = smart_resize(image.height, image.width, s.resize_factor, s.min_pixels, s.max_pixels)
        # A name ("bicubic"); bundles exported from a saved processor config before the
        # exporter wrote names hold PIL's number ("3").
        resample = Image.Resampling(int(s.resample)) if s.resample.isdigit() else Image.Resampling[s.resample.upper()]
        x = np.asarray(image.resize((width, height), resample=resample))
        # float64 then float32, mean and std in float32: the processor's own arithmetic
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
        x = (x - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> list[list[int]]:
        """Images -> their blocks: BOI "{h}*{w}" IMAGE_WRAPPER, h rows of w visual ids each
        followed by EOL, EOF, EOI (transformers writes <image> placeholders there and puts
        the same ids' embeddings in their place)."""
        if not images:
            return []
        s = self.spec
        graph = self.pipe.graph("vq_encoder")
        names = self.pipe.manifest.role("vq_encoder")
        out = names.name("codes")
        blocks = []
        for image in images:   # one at a time: sizes differ, and the processor pads, we need not
            pixels = self.image_pixels(image)
            # Refused before the encoder runs: a block longer than the whole cache could
            # never be read, and the encoder's cost grows with the pixels.
            tokens = (pixels.shape[2] // s.spatial_factor) * (pixels.shape[3] // s.spatial_factor + 1)
            if tokens > self.pipe.max_length:
                raise ContextTooLongError(
                    f"a {image.width}x{image.height} image is resized to {pixels.shape[3]}x{pixels.shape[2]} "
                    f"(the processor's {s.min_pixels}..{s.max_pixels} pixels), {tokens} image tokens: beyond "
                    f"max_length {self.pipe.max_length}")
            codes = graph.run({names.name("pixel_values"): pixels}, [out])[out][0]
            rows, cols = codes.shape
            grid = np.concatenate([codes + s.visual_token_start, np.full((rows, 1), s.eol_token_id)], axis=1)
            blocks.append([s.boi_token_id] + self._encode(f"{rows}*{cols}") + [s.image_wrapper_token_id]
                          + grid.reshape(-1).astype(int).tolist() + [s.eof_token_id, s.eoi_token_id])
        return blocks

    def image_prompt(self, prompt: str, rows: int, cols: int) -> list[int]:
        """The prompt ids for an image of rows x cols codes, as Emu3Processor writes a
        generation prompt: BOS, the text, then BOI "{h}*{w}" IMAGE_WRAPPER (h, w in codes)."""
        if not isinstance(prompt, str):
            raise ValueError(f"an emu3 image prompt is a string, got {type(prompt).__name__}")
        s = self.spec
        # Emu3's special tokens split the text, so encoding the pieces apart gives the ids
        # the processor gets from the whole string.
        return (self.bos + self._encode(prompt) + [s.boi_token_id] + self._encode(f"{rows}*{cols}")
                + [s.image_wrapper_token_id])

    # -- image generation ------------------------------------------------------------------

    def image_codes_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Pixels -> codes (rows, cols). None: the bundle's image_area, square (as the
        processor's default ratio 1:1)."""
        f = self.spec.spatial_factor
        if height is None and width is None:
            side = max(1, round(math.sqrt(self.spec.image_area) / f)) * f
            height = width = side
        height = width if height is None else height
        width = height if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < f:
                raise ValueError(f"{name} must be an integer number of pixels >= {f} (one code), got {value!r}")
            if value % f:
                below = value // f * f
                nearest = f"{below} or {below + f}"
                raise ValueError(f"{name} {value} is not a multiple of {f} (the VQ decoder's pixels per code); "
                                 f"the nearest valid {name}s are {nearest}")
        return int(height) // f, int(width) // f

    def _check_room(self, prompt_length: int, rows: int, cols: int) -> None:
        """The prompt and every image token must fit the cache; refused before any step,
        naming the largest image that fits."""
        f = self.spec.spatial_factor
        new = rows * (cols + 1) + 1          # rows of codes + EOL each, then EOF
        needed = prompt_length + new - 1     # the last token (EOF) is never fed back
        limit = self.pipe.max_length
        if needed <= limit:
            return
        room = limit - prompt_length         # positions left for rows * (cols + 1)
        fit_rows = max(0, room // (cols + 1))
        side = max(0, int((math.sqrt(1 + 4 * max(room, 0)) - 1) // 2))   # n * (n + 1) <= room
        while (side + 1) * (side + 2) <= room:
            side += 1
        largest = (f"{fit_rows * f}x{cols * f} (height x width) at this width, or {side * f}x{side * f} square"
                   if side else "none: the prompt leaves no room for a row")
        raise ContextTooLongError(
            f"a {rows * f}x{cols * f} image is {rows}x{cols} codes, {new} tokens with the row ends and EOF; with "
            f"the prompt ({prompt_length} tokens) it needs {needed} positions, beyond max_length {limit}. "
            f"Largest that fits: {largest}")

    def image_defaults(self, guidance: float | None, top_k: int | None, top_p: float | None,
                       temperature: float | None) -> dict:
        """The settings given, the rest the bundle's generation defaults (transformers'
        generation_config names)."""
        d = self.pipe.manifest.model.generation or {}
        chosen = {"guidance": d.get("guidance_scale", 1.0) if guidance is None else guidance,
                  "top_k": d.get("top_k", 0) if top_k is None else top_k,
                  "top_p": d.get("top_p", 1.0) if top_p is None else top_p,
                  "temperature": d.get("temperature", 1.0) if temperature is None else temperature}
        g = chosen["guidance"]
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not np.isfinite(g) or g < 0:
            raise ValueError(f"guidance must be a number >= 0 (1 = no guidance), got {g!r}")
        # top_k 1 is greedy; without sampling in the defaults every choice is greedy too.
        chosen["do_sample"] = bool(d.get("do_sample", True)) and chosen["top_k"] != 1
        return chosen

    def generate_image(self, prompt: str, height: int | None = None, width: int | None = None,
                       guidance: float | None = None, negative_prompt: str | None = None,
                       top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
                       seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Image.Image:
        """An image for a text prompt; height and width in pixels (multiples of the VQ
        spatial factor). guidance 1 turns classifier-free guidance off; top_k=1 is greedy;
        None takes the bundle's defaults."""
        return self.generate_image_batch([prompt], height, width, guidance, negative_prompt, top_k, top_p,
                                         temperature, seed, progress)[0]

    def generate_image_batch(self, prompts: list[str], height: int | None = None, width: int | None = None,
                             guidance: float | None = None, negative_prompt: str | None = None,
                             top_k: int | None = None, top_p: float | None = None,
                             temperature: float | None = None, seed: int = 0,
                             progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """generate_image for several prompts in one batched decode (two rows each with
        guidance: the prompt and the negative prompt)."""
        ids = self.image_ids(prompts, height, width, guidance, negative_prompt, top_k, top_p, temperature, seed,
                             progress)
        rows, cols = self.image_codes_size(height, width)
        return self.decode_image_ids(ids, rows, cols)

    def image_ids(self, prompts: list[str], height: int | None = None, width: int | None = None,
                  guidance: float | None = None, negative_prompt: str | None = None, top_k: int | None = None,
                  top_p: float | None = None, temperature: float | None = None, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The generated image tokens [B, rows * (cols + 1) + 1]: rows of visual ids each
        ending in EOL, then EOF (EOI follows implicitly; transformers generates it). seed:
        one for the batch, or [(seed, rows), ...] (sampling.seed_groups)."""
        self._check_prompts(prompts)
        groups = seed_groups(seed, len(prompts))   # a request's rows draw what they draw alone
        rows, cols = self.image_codes_size(height, width)
        chosen = self.image_defaults(guidance, top_k, top_p, temperature)
        sampler = Sampler(SamplingConfig(do_sample=chosen["do_sample"], top_k=chosen["top_k"] if chosen["do_sample"]
                                         else 0, top_p=chosen["top_p"], temperature=chosen["temperature"]),
                          groups=groups)
        histories: list[list[int]] = [self.image_prompt(p, rows, cols) for p in prompts]

        def choose(pos: int, scores: np.ndarray) -> np.ndarray:
            return text.sample(sampler, scores, histories, [], self._visual_mask)

        def fed(pos: int, tokens: np.ndarray) -> None:
            for b in range(len(prompts)):
                histories[b].append(int(tokens[b]))
            if progress is not None:
                progress(pos + 1, rows * (cols + 1) + 1)

        return self._image_loop(prompts, rows, cols, chosen["guidance"], negative_prompt, choose, fed)

    def image_top1(self, prompts: list[str], ids: np.ndarray, height: int | None = None, width: int | None = None,
                   guidance: float | None = None, negative_prompt: str | None = None) -> np.ndarray:
        """Teacher forced: the given image tokens (image_ids' [B, rows * (cols + 1) + 1])
        fed back as image_ids feeds its own, and the most likely id at each position under
        the same guidance and allowed-token mask, [B, same]; where only one id is allowed
        (EOL, EOF), that id. How far another bundle's choices follow these tokens."""
        self._check_prompts(prompts)
        rows, cols = self.image_codes_size(height, width)
        ids = np.asarray(ids, np.int64)
        total = rows * (cols + 1) + 1
        if ids.shape != (len(prompts), total):
            raise ValueError(f"ids of {len(prompts)} {rows}x{cols}-code images have shape {[len(prompts), total]}, "
                             f"got {list(ids.shape)}")
        top1 = ids.copy()   # where one id is allowed, it stays

        def choose(pos: int, scores: np.ndarray) -> np.ndarray:
            top1[:, pos] = apply_allowed(scores, self._visual_mask).argmax(axis=-1)
            return ids[:, pos]

        def fed(pos: int, tokens: np.ndarray) -> None:
            if not np.array_equal(tokens, ids[:, pos]):
                raise ValueError(f"ids[:, {pos}] must be {int(tokens[0])}, the row end or image end that a "
                                 f"{rows}x{cols}-code image has there: pass image_ids' tokens of the same size")

        guidance = self.image_defaults(guidance, None, None, None)["guidance"]
        self._image_loop(prompts, rows, cols, guidance, negative_prompt, choose, fed)
        return top1

    def _check_prompts(self, prompts) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts is a non-empty list of strings")

    def _image_loop(self, prompts: list[str], rows: int, cols: int, guidance: float, negative_prompt: str | None,
                    choose: Callable[[int, np.ndarray], np.ndarray],
                    fed: Callable[[int, np.ndarray], None]) -> np.ndarray:
        """The image-token loop: at each position, the id forced there (EOL, EOF) or
        choose(pos, scores) on the guided logits of the n prompts [n, V]; fed(pos, tokens)
        sees what was chosen before it is fed back. -> the tokens [n, rows * (cols + 1) + 1]."""
        prompt_rows = self._prompt_rows(prompts, rows, cols, guidance, negative_prompt)
        memory = self._memory(prompt_rows, rows, cols)
        memory.check()
        cond = prompt_rows[: len(prompts)]
        guided = len(prompt_rows) > len(cond)
        n = len(cond)
        total = rows * (cols + 1) + 1
        out_ids = np.empty((n, total), np.int64)
        s = self.spec
        # A session as long as this image needs, not the bundle's max_length (room for its
        # largest image): smaller images take a cache of their own size.
        with self.pipe.borrow_session(len(prompt_rows), memory.positions) as session:
            out = text.prefill(session, prompt_rows)
            for pos in range(total):
                # Which ids may come here: a visual id inside a row, EOL at its end, EOF
                # after the last row (transformers' docs write the same prefix constraint).
                if pos == total - 1:
                    forced = s.eof_token_id
                elif pos % (cols + 1) == cols:
                    forced = s.eol_token_id
                else:
                    forced = None
                if forced is not None:
                    # One allowed id: nothing to weigh or draw.
                    tokens = np.full(n, forced, np.int64)
                else:
                    scores = out.logits[:n]
                    if guided:
                        scores = cfg_mix(scores, out.logits[n:], guidance)
                    tokens = choose(pos, scores)
                out_ids[:, pos] = tokens
                fed(pos, tokens)
                if pos == total - 1:
                    break
                # The unconditional rows follow the same image: they are fed the chosen token.
                out = text.decode_step(session, np.concatenate([tokens, tokens]) if guided else tokens)
        return out_ids

    def _prompt_rows(self, prompts: list[str], rows: int, cols: int, guidance: float,
                     negative_prompt: str | None) -> list[list[int]]:
        """The decoder rows of a batch: the prompts, then (with guidance) the negative prompt
        once per prompt."""
        cond = [self.image_prompt(p, rows, cols) for p in prompts]
        if guidance == 1:   # as transformers: scale 1 adds no unconditional pass
            return cond
        if negative_prompt is None:
            negative_prompt = (self.pipe.manifest.model.generation or {}).get("negative_prompt", "")
        return cond + [self.image_prompt(negative_prompt, rows, cols)] * len(cond)

    def _memory(self, prompt_rows: list[list[int]], rows: int, cols: int) -> ImageMemory:
        longest = max(len(r) for r in prompt_rows)
        self._check_room(longest, rows, cols)
        positions = longest + rows * (cols + 1)   # the last token (EOF) is never fed back
        kv = self.pipe.manifest.model.kv
        f = self.spec.spatial_factor
        return ImageMemory(rows * f, cols * f, len(prompt_rows), positions, kv.bytes_for(len(prompt_rows), positions),
                           kv.dtype)

    def image_memory(self, prompts: list[str], height: int | None = None, width: int | None = None,
                     guidance: float | None = None, negative_prompt: str | None = None) -> ImageMemory:
        """What image_ids with these arguments allocates for its KV cache (nothing is
        allocated here); raises as image_ids would when the image cannot fit the context."""
        self._check_prompts(prompts)
        rows, cols = self.image_codes_size(height, width)
        chosen = self.image_defaults(guidance, None, None, None)
        return self._memory(self._prompt_rows(prompts, rows, cols, chosen["guidance"], negative_prompt), rows, cols)

    def image_sizes(self) -> str:
        """The sizes this bundle draws, in words."""
        f, side = self.spec.spatial_factor, self.image_codes_size(None, None)[0] * self.spec.spatial_factor
        return (f"width and height multiples of {f} pixels (default {side}x{side}), up to what max_length "
                f"{self.pipe.max_length} holds")

    def image_request(self, prompt: str, images=(), n: int = 1, width: int | None = None, height: int | None = None,
                      guidance: float | None = None, steps: int | None = None, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """n images for a prompt: the one call that the two families share (a server's
        image routes). Emu3 draws from text alone, without denoising steps."""
        return self.image_requests([(prompt, images, n, seed)], width, height, guidance, steps, progress)[0]

    def image_requests(self, requests: list, width: int | None = None, height: int | None = None,
                       guidance: float | None = None, steps: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]:
        """Several image_request calls of the same settings in one batch: requests are
        (prompt, images, n, seed); each gets the images it gets alone."""
        if any(images for _, images, _, _ in requests):
            raise UnsupportedRequest("emu3 bundles draw from a text prompt only; they do not edit images")
        if steps is not None:
            raise ValueError("emu3 bundles write images token by token: there are no denoising steps")
        flat = self.generate_image_batch([prompt for prompt, _, n, _ in requests for _ in range(n)], height, width,
                                         guidance, seed=[(seed, n) for *_, n, seed in requests], progress=progress)
        return split_by(flat, [n for _, _, n, _ in requests])

    def autoencode(self, image) -> Image.Image:
        """The VQ-VAE's round trip: the image's codes, what the decoder reads of it, drawn back."""
        image = load_image(image)
        f = self.spec.spatial_factor
        _, _, height, width = self.image_pixels(image).shape
        rows, cols = height // f, width // f
        block = self.encode_images([image])[0]
        return self.decode_image_ids(np.asarray([block[-rows * (cols + 1) - 2:-2]]), rows, cols)[0]

    def decode_image_ids(self, ids: np.ndarray, rows: int, cols: int) -> list[Image.Image]:
        """Generated image tokens [B, >= rows * (cols + 1)] -> PIL images: the EOL column
        dropped, ids -> codes, the VQ decoder, then the processor's postprocess."""
        s = self.spec
        grid = np.asarray(ids)[:, :rows * (cols + 1)].reshape(-1, rows, cols + 1)
        if np.any(grid[:, :, cols] != s.eol_token_id):
            raise ValueError("the image tokens do not end every row with EOL")
        codes = grid[:, :, :cols] - s.visual_token_start
        if codes.min() < 0 or codes.max() >= s.codebook_size:
            raise ValueError("the image tokens hold ids outside the visual range")
        names = self.pipe.manifest.role("vq_decoder")
        out = names.name("pixels")
        pixels = self.pipe.graph("vq_decoder").run({names.name("codes"): np.ascontiguousarray(codes, np.int64)},
                                                   [out])[out]
        return [self.postprocess(p) for p in pixels]

    def postprocess(self, pixels: np.ndarray) -> Image.Image:
        """[3, H, W] in the processor's normalised space -> PIL, as Emu3ImageProcessor's
        postprocess: x * std + mean, / rescale_factor, clipped, truncated to uint8."""
        s = self.spec
        mean = np.asarray(s.image_mean, np.float32)[:, None, None]
        std = np.asarray(s.image_std, np.float32)[:, None, None]
        x = np.asarray(pixels, np.float32) * std + mean
        x = (x.astype(np.float64) / s.rescale_factor).astype(np.float32)
        return Image.fromarray(np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cfg_mix(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor: both log-softmaxed,
    then scale * (cond - uncond) + uncond."""
    cond, uncond = log_softmax(cond.astype(np.float32)), log_softmax(uncond.astype(np.float32))
    return (np.float32(scale) * (cond - uncond) + uncond).astype(np.float32)


