"""The Emu2 family: continuous visual embeddings in, regressed embeddings and a U-Net out.

    image ──► vision_encoder ──► N embeddings at the layout's placeholder positions
    prompt ──► decoder ──► text (the shared text core), or N regressed embeddings
    N regressed embeddings ──► U-Net (cond and uncond in one call per step) ──► image

Written out plainly for this family alone (diffusers' one pipeline per family): a family
whose images travel differently gets its own module, not a branch in this one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from emu_edge.runtime.decoder import ContextTooLongError
from emu_edge.runtime.families import split_by
from emu_edge.runtime.families.llm import no_system
from emu_edge.runtime.images import load_image, preprocess, sample_frames, to_pil
from emu_edge.runtime.prompt import Encoded, PromptBuilder
from emu_edge.runtime.sampling import seed_groups
from emu_edge.runtime.schedulers import initial_noise, make_scheduler


class Emu2:
    def __init__(self, pipe):
        self.pipe = pipe
        model = pipe.manifest.model
        self.spec = model.emu2
        tok = pipe.tokenizer
        self.builder = PromptBuilder(model.prompt, lambda t: tok.encode(t, add_special_tokens=False).ids,
                                     self.spec.counts())
        # The text loops never sample the placeholder: it stands for a visual embedding,
        # which a text step cannot supply (fed back, it would stop the loop with an error).
        self.banned_ids = [self.builder.placeholder_id]
        self._uncond: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- prompts ---------------------------------------------------------------------------

    def segments(self, items, video_frames: int | None = None) -> list[tuple[str, object]]:
        """Interleaved items -> prompt segments. A str is text; a PIL image, an [H, W, C]
        array or a pathlib.Path is an image; a list or tuple of images (or an [T, H, W, C]
        array) is a video clip, sampled uniformly to `video_frames` (default: the bundle's)."""
        frames = video_frames or self.spec.video_frames
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
                                          f"the {budget} that max_length {self.pipe.max_length} leaves")
            segs = segs[1:]
            encoded = self.builder.encode(task, segs, generate=generate)
        return encoded

    def text_prompts(self, batch, template: str, truncate: bool, max_new_tokens: int, video_frames,
                     system: str | None = None):
        """Token rows and the visual embeddings of all rows, in order."""
        no_system(system)
        budget = self.pipe.max_length - max_new_tokens + 1
        encoded = [self.encode_items(items, "text", template, video_frames, budget if truncate else None)
                   for items in batch]
        return [e.ids for e in encoded], self.encode_visuals([v for e in encoded for v in e.visuals])

    def chat_turn(self, items, video_frames, previous: list[int] | None, system: str | None = None):
        """A conversation turn's new ids: later turns (previous: the last answer's unfed
        end, its EOS) continue the cached sequence after that EOS, so the sequence start is
        not written again (as in the training sequences)."""
        no_system(system)
        encoded = self.encode_items(items, "text", "chat", video_frames)
        ids = encoded.ids if previous is None else previous + encoded.ids[len(self.builder.begin_ids):]
        return ids, self.encode_visuals(encoded.visuals)

    def chat_prompt(self, turns, system: str | None = None):
        """A whole conversation as one prompt: turns are (items, answer or None), the last
        one unanswered; each answer is followed by EOS and the next turn continues the
        sequence, as in Conversation and the training sequences. -> (ids, visuals)."""
        no_system(system)
        eos = self.pipe.manifest.model.eos_ids()
        ids: list[int] = []
        visuals = []
        for i, (items, answer) in enumerate(turns):
            encoded = self.encode_items(items, "text", "chat")
            ids += encoded.ids if i == 0 else encoded.ids[len(self.builder.begin_ids):]
            visuals += encoded.visuals
            if answer is not None:
                ids += self.pipe.tokenizer.encode(answer, add_special_tokens=False).ids + eos[:1]
        return ids, self.encode_visuals(visuals)

    # -- images in -------------------------------------------------------------------------

    def encode_visuals(self, visuals) -> np.ndarray | None:
        """Visual embeddings of images and video frames, in sequence order: [M, visual_dim].
        All images go through the vision encoder in one call, all frames in another."""
        if not visuals:
            return None
        m = self.spec
        vision = self.pipe.graph("vision_encoder")
        names = self.pipe.manifest.role("vision_encoder")

        def run(pictures, key):
            pixels = preprocess(pictures, m.image_size, m.image_mean, m.image_std)
            out = names.name(key)
            return vision.run({names.name("pixel_values"): pixels}, [out])[out]

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

    # -- images out ------------------------------------------------------------------------

    def regress(self, encoded: list[Encoded]) -> np.ndarray:
        """Prompts ending in the layout's generate_image part -> their N visual embeddings
        [B, N, visual_dim]: each decode step's regressed embedding is fed back as the next
        placeholder's input."""
        n = self.spec.n_query
        rows = [e.ids for e in encoded]
        needed = max(len(r) for r in rows) + n - 1
        if needed > self.pipe.max_length:
            raise ContextTooLongError(f"prompt ({max(len(r) for r in rows)} tokens) + {n} visual embeddings "
                                      f"needs {needed} positions, beyond max_length {self.pipe.max_length}")
        visual = self.encode_visuals([v for e in encoded for v in e.visuals])
        with self.pipe.borrow_session(len(rows)) as session:
            out = session.prefill(rows, visual)
            embeds = [out.regressed]
            for _ in range(n - 1):
                embeds.append(session.step_regressed().regressed)
        return np.stack(embeds, axis=1)

    def unconditional(self, n: int, dim: int) -> np.ndarray:
        """The embeddings classifier-free guidance contrasts with, computed once."""
        kind = self.spec.unconditional_embedding.get("kind", "zeros")
        if kind != "zeros":
            raise ValueError(f"unknown unconditional embedding {kind!r} in the manifest (this runtime knows 'zeros')")
        with self._lock:
            if self._uncond is None or self._uncond.shape != (n, dim):
                self._uncond = np.zeros((n, dim), np.float32)
            return self._uncond

    def image_defaults(self, steps: int | None = None, guidance: float | None = None,
                       scheduler: str | None = None) -> dict:
        """Image generation settings {steps, guidance, scheduler}: those given, the rest the
        bundle's defaults."""
        defaults = self.pipe.manifest.model.generation or {}
        return {"steps": defaults.get("steps", 25) if steps is None else steps,
                "guidance": defaults.get("guidance", 3.0) if guidance is None else guidance,
                "scheduler": defaults.get("scheduler", "ddim") if scheduler is None else scheduler}

    def denoise(self, cond: np.ndarray, steps: int | None = None, guidance: float | None = None,
                scheduler: str | None = None, seed: int | list = 0,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The U-Net loop: cond [B, N, D] -> images [B, 3, S, S] in [-1, 1]. Conditional and
        unconditional branches run in ONE batched U-Net call per step. seed: one for the
        batch, or [(seed, rows), ...] (sampling.seed_groups)."""
        m = self.spec
        chosen = self.image_defaults(steps, guidance, scheduler)
        steps, guidance, scheduler = chosen["steps"], chosen["guidance"], chosen["scheduler"]
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a number >= 0 (1 = no guidance), got {guidance!r}")
        groups = seed_groups(seed, cond.shape[0])
        sched = make_scheduler(scheduler, m.scheduler or {})
        sched.set_timesteps(steps)
        unet = self.pipe.graph("unet")
        names = self.pipe.manifest.role("unet")
        sample_name, t_name, cond_name, out_name = (names.name(k) for k in
                                                    ("sample", "timestep", "encoder_hidden_states", "noise_pred"))
        b = cond.shape[0]
        # one draw per seed group: a request's rows get the noise they get alone
        x = np.concatenate([initial_noise(value, (rows, 3, m.image_size, m.image_size)) for value, rows in groups])
        x = x * np.float32(sched.init_noise_sigma)
        both = np.concatenate([cond, np.broadcast_to(self.unconditional(*cond.shape[1:]), cond.shape)])
        both = np.ascontiguousarray(both, dtype=np.float32)
        timesteps = sched.timesteps
        for i, t in enumerate(timesteps):
            sample = sched.scale_model_input(np.concatenate([x, x]), t).astype(np.float32)
            eps = unet.run({sample_name: sample, t_name: np.full(2 * b, t, np.float32), cond_name: both},
                           [out_name])[out_name]
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

    def generate_image_batch(self, batch: list, steps: int | None = None, guidance: float | None = None,
                             scheduler: str | None = None, seed: int = 0,
                             progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        if not batch:
            raise ValueError("the batch is empty")
        cond = self.regress([self.encode_items(items, "image") for items in batch])
        images = self.denoise(cond, steps, guidance, scheduler, seed, progress)
        return [to_pil(x, value_range=(-1, 1)) for x in images]

    def image_sizes(self) -> str:
        """The sizes this bundle draws, in words (one: the U-Net's)."""
        return f"{self.spec.image_size}x{self.spec.image_size}"

    def image_request(self, prompt: str, images=(), n: int = 1, width: int | None = None, height: int | None = None,
                      guidance: float | None = None, steps: int | None = None, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """n images for a prompt, after the given images (subject-driven): the one call
        that the two families share (a server's image routes)."""
        return self.image_requests([(prompt, images, n, seed)], width, height, guidance, steps, progress)[0]

    def image_requests(self, requests: list, width: int | None = None, height: int | None = None,
                       guidance: float | None = None, steps: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]:
        """Several image_request calls of the same settings in one batch: requests are
        (prompt, images, n, seed); each gets the images it gets alone."""
        side = self.spec.image_size
        if (width or side, height or side) != (side, side):
            raise ValueError(f"this bundle draws {self.image_sizes()} images only, not {width}x{height}")
        batch = [[*images, prompt] for prompt, images, n, _ in requests for _ in range(n)]
        flat = self.generate_image_batch(batch, steps, guidance, seed=[(seed, n) for *_, n, seed in requests],
                                         progress=progress)
        return split_by(flat, [n for _, _, n, _ in requests])

    def autoencode(self, image, steps: int | None = None, guidance: float | None = None,
                   scheduler: str | None = None, seed: int = 0) -> Image.Image:
        """The image through the vision encoder and back through the U-Net (Emu2's detokenizer)."""
        cond = self.encode_visuals([("image", load_image(image))])[None]
        return to_pil(self.denoise(cond, steps, guidance, scheduler, seed)[0], value_range=(-1, 1))
