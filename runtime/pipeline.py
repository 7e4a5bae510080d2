"""Pipeline: a bundle opened for generation.

    pipe = Pipeline.load("bundle/", device="cpu", threads=2)
    pipe.generate_ids([1, 17, 42], max_new_tokens=32)        # -> new token ids
    pipe.generate_text("a red circle", max_new_tokens=32)    # -> new text

    # bundles exported from an emu-edge checkpoint also read and write images:
    pipe.generate_text([image, "what colour is the circle?"])      # -> "red"
    pipe.generate_image(["a red circle"], steps=25, seed=0)         # -> PIL.Image
    chat = pipe.conversation(); chat.ask([image, "what is in the image?"]); chat.ask(["where is it?"])

The text loop is three small verbs over a DecoderSession, as in gpt-fast's generate.py:
`prefill` (embed the prompts, fill the cache), `decode_one` (one token per row) and
`generate` (sample, check for EOS, repeat). The image loop is built from the same verbs:
`regress` ([IMG], then one decode step per visual embedding, each fed back through
project_up in embed.onnx) and `denoise` (the U-Net with cond and uncond in one call).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from emu_edge.runtime.backends import create_backend
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.decoder import ContextTooLongError, DecoderOutput, DecoderSession
from emu_edge.runtime.images import load_image, preprocess, sample_frames, to_pil
from emu_edge.runtime.prompt import EOS, IMAGE, Encoded, PromptBuilder
from emu_edge.runtime.sampling import Sampler, SamplingConfig, StopChecker
from emu_edge.runtime.schedulers import initial_noise, make_scheduler

VIDEO_FRAME_COUNTS = (8, 12, 16)


class Pipeline:
    def __init__(self, bundle: Bundle, backends: dict, max_length: int, device: str,
                 backend: str = "onnxruntime", threads: int | None = None):
        self.bundle = bundle
        self.backends = backends
        self.max_length = max_length
        self.device = device
        self.backend_kind = backend
        self.threads = threads
        self._session: DecoderSession | None = None
        self._builder: PromptBuilder | None = None
        self._uncond: np.ndarray | None = None
        # Read once: the text loop masks it at every step.
        layout = bundle.manifest.model.prompt
        self._image_id: int | None = layout.token_id(layout.placeholder) if layout and layout.placeholder else None

    @classmethod
    def load(cls, bundle: str | Path | Bundle, device: str = "cpu", backend: str = "onnxruntime",
             threads: int | None = None, max_length: int | None = None, verify: bool = True) -> Pipeline:
        """Open a bundle and create one backend per graph. max_length (default: the bundle's)
        sizes the KV cache; it cannot exceed what the decoder was exported for."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify=verify)
        model = bundle.manifest.model
        if max_length is None:
            max_length = model.max_length
        if not 1 <= max_length <= model.max_length:
            raise ValueError(f"max_length must be in 1..{model.max_length} (the decoder's rotary tables "
                             f"end there; re-export with a larger --max-length), got {max_length}")
        # The embedding graph runs on one thread: it is a table lookup (plus one small
        # projection), and a second thread pool would keep spinning beside the decoder's
        # between their alternating calls, taking a core from it (on 2 cores this halved the
        # decode step during image-embedding regression).
        backends = {"embed": create_backend(bundle.graph_path("embed"), backend=backend, device=device, threads=1),
                    "decoder": create_backend(bundle.graph_path("decoder"), backend=backend, device=device,
                                              threads=threads)}
        return cls(bundle, backends, max_length, device, backend, threads)

    @property
    def manifest(self):
        return self.bundle.manifest

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    # -- building blocks ------------------------------------------------------------------

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """input_ids [B, S] (+ image_embeds [N, visual_dim] for the N image tokens) -> [B, S, H]."""
        backend = self.backends["embed"]
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        self._check_placeholders(feeds["input_ids"], 0 if image_embeds is None else len(image_embeds))
        if "image_embeds" in backend.input_names:
            if image_embeds is None:
                # No image tokens: an empty [0, visual_dim] block (onnxruntime takes 0-sized dims).
                image_embeds = np.zeros([0, backend.input_shapes["image_embeds"][1]], np.float32)
            feeds["image_embeds"] = np.ascontiguousarray(image_embeds, dtype=np.float32)
        elif image_embeds is not None:
            raise ValueError("this bundle's embed graph takes no image embeddings (a text-only bundle)")
        return backend.run(feeds, ["inputs_embeds"])["inputs_embeds"]

    def _check_placeholders(self, ids: np.ndarray, given: int) -> None:
        """Every <image> id in `ids` needs one of the `given` visual embeddings."""
        placeholders = int((ids == self._image_id).sum()) if self._image_id is not None else 0
        if placeholders != given:
            raise ValueError(f"{placeholders} {IMAGE} placeholder token(s) (id {self._image_id}) but {given} image "
                             f"embedding(s); pass images as items (generate_text, generate_image), not their "
                             f"placeholder ids")

    def _text_scores(self, logits: np.ndarray) -> np.ndarray:
        """The text loops never sample <image>: it stands for a visual embedding, which a
        text step cannot supply (fed back, it would stop the loop with an error)."""
        if self._image_id is not None:
            logits[:, self._image_id] = -np.inf
        return logits

    def session(self, batch: int = 1) -> DecoderSession:
        """The decoder session for `batch` rows; its KV cache is allocated once and reused
        by later calls with the same batch size."""
        if self._session is None or self._session.batch != batch:
            self._session = None  # free the old cache before allocating the new one
            self._session = DecoderSession(self.backends["decoder"], self.manifest.model, batch, self.max_length)
        return self._session

    def prefill(self, session: DecoderSession, rows: list[list[int]],
                visual: np.ndarray | None = None) -> DecoderOutput:
        """Fill the cache with one prompt per row (right-padded; each row keeps its length).
        visual: the embeddings of every <image> position, rows in order ([M, visual_dim])."""
        lengths = [len(r) for r in rows]
        pad = self.manifest.model.pad_token_id or 0
        ids = np.full((len(rows), max(lengths)), pad, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        return session.prefill(self.embed(ids, visual), lengths)

    def extend(self, session: DecoderSession, ids: list[list[int]]) -> DecoderOutput:
        """Append tokens to every row of a filled cache (the next turn of a conversation)."""
        return session.extend(self.embed(np.asarray(ids, dtype=np.int64)))

    def decode_one(self, session: DecoderSession, tokens: np.ndarray) -> DecoderOutput:
        """Feed one token per row; tokens [B]."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        self._check_placeholders(ids, 0)  # the CPU fast path below skips embed() and its check
        return session.step_ids(ids, self.backends["embed"], self.embed)

    def stream_ids(self, rows: list[list[int]], max_new_tokens: int, sampler: Sampler, stop_ids: list[int],
                   visual: np.ndarray | None = None) -> Iterator[list[int | None]]:
        """The text loop: at each step, the new token of every row (None once a row has
        stopped; a row's stop token is yielded, then it stops)."""
        if max_new_tokens <= 0:
            return
        # The last new token is never fed back, hence the - 1.
        needed = max(len(r) for r in rows) + max_new_tokens - 1
        if needed > self.max_length:
            raise ContextTooLongError(
                f"prompt ({max(len(r) for r in rows)} tokens) + max_new_tokens ({max_new_tokens}) needs "
                f"{needed} positions, beyond max_length {self.max_length}; shorten the prompt, lower "
                "max_new_tokens, or pass truncate=True to drop the oldest items")
        session = self.session(len(rows))
        embed_backend = self.backends["embed"]
        out = self.prefill(session, rows, visual)
        history = [list(r) for r in rows]
        done = [False] * len(rows)
        stop = set(stop_ids)
        for step in range(max_new_tokens):
            tokens = sampler(self._text_scores(out.logits), history)
            yield [None if done[b] else t for b, t in enumerate(tokens.tolist())]
            for b, token in enumerate(tokens.tolist()):
                if not done[b]:
                    history[b].append(token)
                    done[b] = token in stop
            if all(done) or step == max_new_tokens - 1:
                break
            # decode_one without its placeholder check: _text_scores never lets the sampler
            # pick <image>.
            out = session.step_ids(tokens.reshape(-1, 1), embed_backend, self.embed)

    def generate(self, rows: list[list[int]], max_new_tokens: int, sampler: Sampler,
                 stop_ids: list[int], visual: np.ndarray | None = None) -> list[list[int]]:
        """New tokens per row, each row ending at (and including) its first stop id."""
        new: list[list[int]] = [[] for _ in rows]
        for tokens in self.stream_ids(rows, max_new_tokens, sampler, stop_ids, visual):
            for b, token in enumerate(tokens):
                if token is not None:
                    new[b].append(token)
        return new

    # -- user-facing ----------------------------------------------------------------------

    def generate_ids(self, input_ids, max_new_tokens: int, do_sample: bool = False, ignore_eos: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, seed: int | None = None):
        """New token ids for a prompt (list[int] -> list[int]) or a batch of prompts
        (list[list[int]] -> list[list[int]]). Greedy unless do_sample; stops at EOS (which
        is included) unless ignore_eos."""
        single = len(input_ids) > 0 and np.ndim(input_ids[0]) == 0
        rows = [_as_ids(input_ids)] if single else [_as_ids(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        vocab = self.manifest.model.vocab_size
        for r in rows:
            if min(r) < 0 or max(r) >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}), got {min(r)}..{max(r)}")
        sampler = Sampler(SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty, seed=seed))
        stop_ids = [] if ignore_eos else self.manifest.model.eos_ids()
        new = self.generate(rows, max_new_tokens, sampler, stop_ids)
        return new[0] if single else new

    def generate_text(self, items, max_new_tokens: int | None = None, stop: list[str] | None = None,
                      template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                      ignore_eos: bool = False, **sampling) -> str:
        """Text out for interleaved items in (str, images, video clips; see `segments`).

        template "auto": images alone are captioned (the plain template), anything with
        text is an instruction ([USER]: ... [ASSISTANT]:). A text-only bundle takes a plain
        string prompt. `sampling` as in generate_ids; `stop` strings end the answer."""
        return self.generate_text_batch([items], max_new_tokens, stop, template, truncate, video_frames,
                                        ignore_eos, **sampling)[0]

    def generate_text_batch(self, batch: list, max_new_tokens: int | None = None, stop: list[str] | None = None,
                            template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                            ignore_eos: bool = False, **sampling) -> list[str]:
        """generate_text for several prompts at once (one batched decode)."""
        if not batch:
            raise ValueError("the batch is empty")
        max_new_tokens = self._max_new_tokens(max_new_tokens)
        checker = StopChecker(stop) if stop else None
        rows, visual = self._prompt_rows(batch, template, truncate, max_new_tokens, video_frames)
        sampler = Sampler(SamplingConfig(**sampling))
        eos = set(self.manifest.model.eos_ids())
        new: list[list[int]] = [[] for _ in rows]
        for tokens in self.stream_ids(rows, max_new_tokens, sampler, [] if ignore_eos else list(eos), visual):
            for b, token in enumerate(tokens):
                if token is not None:
                    new[b].append(token)
            if checker and all(checker.check(self._decode(n)) is not None for n in new):
                break
        texts = [self._decode(n) for n in new]
        if checker:
            texts = [t[: checker.check(t)] if checker.check(t) is not None else t for t in texts]
        return [t.strip() for t in texts]

    def stream_text(self, items, max_new_tokens: int | None = None, stop: list[str] | None = None,
                    template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                    **sampling) -> Iterator[str]:
        """generate_text, yielding the text as it is produced."""
        max_new_tokens = self._max_new_tokens(max_new_tokens)
        rows, visual = self._prompt_rows([items], template, truncate, max_new_tokens, video_frames)
        tokens = (t[0] for t in self.stream_ids(rows, max_new_tokens, Sampler(SamplingConfig(**sampling)),
                                                self.manifest.model.eos_ids(), visual) if t[0] is not None)
        yield from self._stream_pieces(tokens, stop)

    def _stream_pieces(self, tokens: Iterator[int], stop: list[str] | None) -> Iterator[str]:
        """Decoded text increments for a stream of token ids. Text that may be the start of a
        stop string is held back until it is known not to be."""
        checker = StopChecker(stop) if stop else None
        eos = set(self.manifest.model.eos_ids())
        ids: list[int] = []
        shown = 0
        text = ""
        for token in tokens:
            if token in eos:
                break
            ids.append(token)
            text = self._decode(ids).lstrip()
            if checker is not None:
                cut = checker.check(text)
                if cut is not None:
                    text = text[:cut]
                    break
                safe = checker.safe_length(text)
            else:
                safe = len(text)
            # A partial UTF-8 sequence decodes to U+FFFD; wait for the rest.
            if safe > shown and "\ufffd" not in text[shown:safe]:
                yield text[shown:safe]
                shown = safe
        if len(text.rstrip()) > shown:
            yield text.rstrip()[shown:]

    def _decode(self, ids: list[int]) -> str:
        eos = set(self.manifest.model.eos_ids())
        return self.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)

    def _max_new_tokens(self, value: int | None) -> int:
        value = self.manifest.model.generation.get("max_new_tokens", 64) if value is None else value
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {value!r}")
        return int(value)

    def _prompt_rows(self, batch, template, truncate, max_new_tokens, video_frames):
        """Token rows and the visual embeddings of all rows, in order."""
        if not self.is_multimodal:
            rows = []
            for prompt in batch:
                if not isinstance(prompt, str):
                    raise ValueError("this bundle is text-only (export-hf --llm): prompts are strings")
                if not prompt.strip():
                    raise ValueError("empty prompt")
                rows.append(self.tokenizer.encode(prompt).ids)
            return rows, None
        budget = self.max_length - max_new_tokens + 1
        encoded = [self.encode_items(items, "text", template, video_frames, budget if truncate else None)
                   for items in batch]
        return [e.ids for e in encoded], self.encode_visuals([v for e in encoded for v in e.visuals])

    # -- multimodal: interleaved text, images and video -------------------------------------

    @property
    def is_multimodal(self) -> bool:
        return self.manifest.model.family == "emu2"

    def graph(self, name: str):
        """The backend of a graph, created on first use (a captioning app never loads the U-Net)."""
        if name not in self.backends:
            if not self.bundle.has_graph(name):
                raise ValueError(f"this bundle has no {name} graph; images need a bundle exported from an "
                                 "emu-edge checkpoint (emu-edge export), not a text-only one")
            self.backends[name] = create_backend(self.bundle.graph_path(name), backend=self.backend_kind,
                                                 device=self.device, threads=self.threads)
        return self.backends[name]

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            m = self.manifest.model
            self.graph("vision_encoder")
            tok = self.tokenizer
            self._builder = PromptBuilder(m.prompt, lambda t: tok.encode(t, add_special_tokens=False).ids,
                                          m.emu2.counts())
        return self._builder

    def segments(self, items, video_frames: int | None = None) -> list[tuple[str, object]]:
        """Interleaved items -> prompt segments. A str is text; a PIL image, an [H, W, C]
        array or a pathlib.Path is an image; a list or tuple of images (or an [T, H, W, C]
        array) is a video clip, sampled uniformly to `video_frames` (default: the bundle's)."""
        frames = video_frames or self.manifest.model.emu2.video_frames
        if frames < 1:
            raise ValueError(f"video_frames must be >= 1 (8, 12 or 16 are typical), got {frames}")
        if isinstance(items, (str, Path, Image.Image, np.ndarray)):
            items = [items]
        segs: list[tuple[str, object]] = []
        for item in items:
            if isinstance(item, str):
                if item.strip():
                    segs.append(("text", item))
            elif isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
                segs.append(("frames", [load_image(f) for f in sample_frames(item, frames)]))
            else:
                segs.append(("image", load_image(item)))
        if not segs:
            raise ValueError("empty prompt: give at least one non-empty text, image or video")
        return segs

    def encode_items(self, items, generate: str, template: str = "auto", video_frames: int | None = None,
                     budget: int | None = None) -> Encoded:
        """Items -> token ids with the model's template. budget: if the prompt is longer,
        drop the oldest items until it fits (truncation); None: a long prompt is an error
        when it runs."""
        segs = self.segments(items, video_frames)
        if template == "auto":
            # Images alone are captioned (the plain template); anything with text is an
            # instruction (the chat template): how the model was trained.
            template = "chat" if generate == "text" and any(k == "text" for k, _ in segs) else "plain"
        if template not in ("plain", "chat"):
            raise ValueError(f"template must be 'auto', 'plain' or 'chat', got {template!r}")
        task = {"chat": "vqa", "plain": "captioning"}[template] if generate == "text" else "text_to_image"
        encoded = self.builder.encode(task, segs, generate=generate)
        while budget is not None and len(encoded.ids) > budget:
            if len(segs) == 1:
                raise ContextTooLongError(f"even the last item alone needs {len(encoded.ids)} tokens, beyond "
                                          f"the {budget} that max_length {self.max_length} leaves")
            segs = segs[1:]
            encoded = self.builder.encode(task, segs, generate=generate)
        return encoded

    def encode_visuals(self, visuals) -> np.ndarray | None:
        """Visual embeddings of images and video frames, in sequence order: [M, visual_dim].
        All images go through the vision encoder in one call, all frames in another."""
        if not visuals:
            return None
        m = self.manifest.model.emu2
        vision = self.graph("vision_encoder")

        def run(pictures, output):
            pixels = preprocess(pictures, m.image_size, m.image_mean, m.image_std)
            return vision.run({"pixel_values": pixels}, [output])[output]

        images = [v for kind, v in visuals if kind == "image"]
        frames = [f for kind, v in visuals if kind == "frames" for f in v]
        image_embeds = iter(run(images, "image_embeds")) if images else None
        frame_embeds = run(frames, "frame_embeds") if frames else None
        parts, first = [], 0
        for kind, value in visuals:
            if kind == "image":
                parts.append(next(image_embeds))
            else:
                parts.append(frame_embeds[first:first + len(value)].reshape(-1, frame_embeds.shape[-1]))
                first += len(value)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def regress(self, encoded: list[Encoded]) -> np.ndarray:
        """Prompts ending in [IMG] -> their N visual embeddings [B, N, visual_dim]: each
        decode step's regressed embedding is fed back as the next <image> input."""
        n = self.manifest.model.emu2.n_query
        rows = [e.ids for e in encoded]
        needed = max(len(r) for r in rows) + n - 1
        if needed > self.max_length:
            raise ContextTooLongError(f"prompt ({max(len(r) for r in rows)} tokens) + {n} visual embeddings "
                                      f"needs {needed} positions, beyond max_length {self.max_length}")
        session = self.session(len(rows))
        out = self.prefill(session, rows, self.encode_visuals([v for e in encoded for v in e.visuals]))
        embeds = [out.regressed]
        for _ in range(n - 1):
            out = session.step_regressed(self._image_id, self.backends["embed"], self.embed)
            embeds.append(out.regressed)
        return np.stack(embeds, axis=1)

    def unconditional(self, n: int, dim: int) -> np.ndarray:
        """The embeddings classifier-free guidance contrasts with, computed once."""
        kind = self.manifest.model.emu2.unconditional_embedding.get("kind", "zeros")
        if kind != "zeros":
            raise ValueError(f"unknown unconditional embedding {kind!r} in the manifest (this runtime knows 'zeros')")
        if self._uncond is None or self._uncond.shape != (n, dim):
            self._uncond = np.zeros((n, dim), np.float32)
        return self._uncond

    def denoise(self, cond: np.ndarray, steps: int | None = None, guidance: float | None = None,
                scheduler: str | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The U-Net loop: cond [B, N, D] -> images [B, 3, S, S] in [-1, 1]. Conditional and
        unconditional branches run in ONE batched U-Net call per step."""
        m = self.manifest.model.emu2
        chosen = self.image_defaults(steps, guidance, scheduler)
        steps, guidance, scheduler = chosen["steps"], chosen["guidance"], chosen["scheduler"]
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a number >= 0 (1 = no guidance), got {guidance!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        sched = make_scheduler(scheduler, m.scheduler or {})
        sched.set_timesteps(steps)
        unet = self.graph("unet")
        b = cond.shape[0]
        x = initial_noise(seed, (b, 3, m.image_size, m.image_size)) * np.float32(sched.init_noise_sigma)
        both = np.concatenate([cond, np.broadcast_to(self.unconditional(*cond.shape[1:]), cond.shape)])
        both = np.ascontiguousarray(both, dtype=np.float32)
        timesteps = sched.timesteps
        for i, t in enumerate(timesteps):
            sample = sched.scale_model_input(np.concatenate([x, x]), t).astype(np.float32)
            eps = unet.run({"sample": sample, "timestep": np.full(2 * b, t, np.float32),
                            "encoder_hidden_states": both}, ["noise_pred"])["noise_pred"]
            cond_eps, uncond_eps = eps[:b], eps[b:]
            x = sched.step(uncond_eps + guidance * (cond_eps - uncond_eps), t, x).prev_sample.astype(np.float32)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x

    def generate_image(self, items, steps: int | None = None, guidance: float | None = None,
                       scheduler: str | None = None, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> Image.Image:
        """An image from interleaved items: text ("a red circle"), or images plus text
        (subject-driven: [image, "make it blue"]), as Emu2-Gen."""
        return self.generate_image_batch([items], steps, guidance, scheduler, seed, progress)[0]

    def image_defaults(self, steps: int | None = None, guidance: float | None = None,
                       scheduler: str | None = None) -> dict:
        """Image generation settings {steps, guidance, scheduler}: those given, the rest the
        bundle's defaults."""
        defaults = self.manifest.model.generation or {}
        return {"steps": defaults.get("steps", 25) if steps is None else steps,
                "guidance": defaults.get("guidance", 3.0) if guidance is None else guidance,
                "scheduler": defaults.get("scheduler", "ddim") if scheduler is None else scheduler}

    def generate_image_batch(self, batch: list, steps: int | None = None, guidance: float | None = None,
                             scheduler: str | None = None, seed: int = 0,
                             progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        if not batch:
            raise ValueError("the batch is empty")
        cond = self.regress([self.encode_items(items, "image") for items in batch])
        images = self.denoise(cond, steps, guidance, scheduler, seed, progress)
        return [to_pil(x, value_range=(-1, 1)) for x in images]

    def autoencode(self, image, steps: int | None = None, guidance: float | None = None,
                   scheduler: str | None = None, seed: int = 0) -> Image.Image:
        """The image through the vision encoder and back through the U-Net (Emu2's detokenizer)."""
        cond = self.encode_visuals([("image", load_image(image))])[None]
        return to_pil(self.denoise(cond, steps, guidance, scheduler, seed)[0], value_range=(-1, 1))

    def conversation(self, max_length: int | None = None) -> Conversation:
        return Conversation(self, max_length)


class Conversation:
    """A multi-turn chat that keeps its own KV cache: each turn prefills only its new tokens.

        chat = pipe.conversation()
        chat.ask([image, "what is in the image?"])
        chat.ask(["what colour is the circle?"])     # the image and first turn stay cached
    """

    def __init__(self, pipe: Pipeline, max_length: int | None = None):
        self.pipe = pipe
        self.session = DecoderSession(pipe.backends["decoder"], pipe.manifest.model, 1, max_length or pipe.max_length)
        self.history: list[int] = []   # every token in the cache (the repetition penalty reads it)
        self.unfed: list[int] = []     # the last answer's end: sampled, not yet in the cache
        self.turns: list[tuple[list, str]] = []

    def ask(self, items, **kwargs) -> str:
        return "".join(self.stream(items, **kwargs)).strip()

    def stream(self, items, max_new_tokens: int | None = None, stop: list[str] | None = None,
               video_frames: int | None = None, **sampling) -> Iterator[str]:
        pipe = self.pipe
        max_new_tokens = pipe._max_new_tokens(max_new_tokens)
        sampler = Sampler(SamplingConfig(**sampling))
        encoded = pipe.encode_items(items, "text", "chat", video_frames)
        # Later turns continue the cached sequence: no second <s>, and the previous
        # answer's </s> goes in first, as in the training sequences.
        ids = encoded.ids if not self.history else self.unfed + encoded.ids[1:]
        if len(self.history) + len(ids) + max_new_tokens - 1 > self.session.max_length:
            raise ContextTooLongError(
                f"this turn would take the conversation to {len(self.history) + len(ids) + max_new_tokens - 1} "
                f"tokens, beyond max_length {self.session.max_length}; start a new conversation")
        embeds = pipe.embed(np.asarray([ids], np.int64), pipe.encode_visuals(encoded.visuals))
        out = self.session.extend(embeds) if self.history else self.session.prefill(embeds)
        self.history += ids
        eos = pipe.manifest.model.prompt.token_id(EOS)

        def tokens():
            nonlocal out
            for step in range(max_new_tokens):
                token = int(sampler(pipe._text_scores(out.logits), [self.history])[0])
                if token == eos:
                    self.unfed = [token]
                    return
                yield token
                if step == max_new_tokens - 1:
                    self.unfed = [token, eos]  # cut off: close the turn
                    return
                self.history.append(token)
                out = self.session.step(pipe.embed(np.asarray([[token]], np.int64)))

        answer = []
        for piece in pipe._stream_pieces(tokens(), stop):
            answer.append(piece)
            yield piece
        self.turns.append((list(items) if isinstance(items, (list, tuple)) else [items], "".join(answer)))


def _as_ids(row) -> list[int]:
    return [int(t) for t in row]
