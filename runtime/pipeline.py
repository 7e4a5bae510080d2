"""Pipeline: a bundle opened for generation.

    from emu_edge.runtime import Pipeline
    pipe = Pipeline.load("bundle/", device="cpu", threads=2)
    pipe.generate_ids([1, 17, 42], max_new_tokens=32)        # -> new token ids
    pipe.generate_text("a red circle", max_new_tokens=32)    # -> new text

    # an emu2 bundle (exported from an emu-edge checkpoint) also reads and writes images:
    pipe.generate_text([image, "what colour is the circle?"])      # -> "red"
    pipe.generate_image(["a red circle"], steps=25, seed=0)         # -> PIL.Image
    chat = pipe.conversation(); chat.ask([image, "what is in the image?"]); chat.ask(["where is it?"])

    # an emu3 bundle (export-hf of an Emu3ForConditionalGeneration folder) writes images as
    # visual tokens (sizes in pixels, classifier-free guidance as transformers mixes it):
    pipe.generate_image("a red circle", height=512, width=512, guidance=3.0, seed=0)

`Pipeline.load` reads the manifest's `model.family` and hands the family's verbs (emu2:
encode_visuals, regress, denoise, generate_image, ...; emu3: generate_image(_batch),
image_ids, decode_image_ids, ...) through; the text verbs are the
same for every family and run the one loop of runtime.text. A Pipeline may be shared by
threads: each call borrows a decoder session (its own KV cache) from a pool and gets the
result it would get alone.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from emu_edge.runtime import text
from emu_edge.runtime.backends import create_backend
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.decoder import DecoderError, DecoderSession
from emu_edge.runtime.families import family_class
from emu_edge.runtime.sampling import Sampler, SamplingConfig, StopChecker

DEFAULT_MAX_SESSIONS = 4


class FamilyVerbError(AttributeError, ValueError):
    """A verb this bundle's family does not have (generate_image on a text-only bundle).
    An AttributeError for hasattr(), a ValueError for the CLI's one-line errors."""


class SessionPool:
    """Decoder sessions lent to one call at a time, at most `max_sessions` alive. A call
    takes a free session of its batch size and length, or makes one (dropping a free one of
    another size when the pool is full), or waits for one to come back."""

    def __init__(self, make, max_sessions: int):
        if not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")
        self._make, self.max_sessions = make, max_sessions
        self._free: list[DecoderSession] = []
        self._alive = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def borrow(self, batch: int, max_length: int):
        session = self._take(batch, max_length)
        try:
            yield session
        finally:
            with self._cond:
                if session is not None:
                    self._free.append(session)
                self._cond.notify()

    def _take(self, batch: int, max_length: int) -> DecoderSession:
        with self._cond:
            while True:
                match = next((s for s in self._free if (s.batch, s.max_length) == (batch, max_length)), None)
                if match is not None:
                    self._free.remove(match)
                    return match
                if self._alive < self.max_sessions or self._free:
                    if self._alive >= self.max_sessions:
                        self._free.pop(0)  # its cache is freed with it
                    else:
                        self._alive += 1
                    break
                self._cond.wait()
        try:
            return self._make(batch, max_length)  # allocated outside the lock: other calls go on
        except BaseException:
            with self._cond:
                self._alive -= 1
                self._cond.notify()
            raise


class Pipeline:
    def __init__(self, bundle: Bundle, backends: dict, max_length: int, device: str,
                 backend: str = "onnxruntime", threads: int | None = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, spin: bool = True):
        self.bundle = bundle
        self.backends = backends       # role -> backend, created on first use
        self.max_length = max_length
        self.device = device
        self.backend_kind = backend
        self.threads = threads
        self.spin = spin
        self._graph_lock = threading.Lock()
        self._sessions = SessionPool(self.session, max_sessions)
        self.family = family_class(bundle.manifest.model.family)(self)

    @classmethod
    def load(cls, bundle: str | Path | Bundle, device: str = "cpu", backend: str = "onnxruntime",
             threads: int | None = None, max_length: int | None = None, verify: bool = True,
             max_sessions: int = DEFAULT_MAX_SESSIONS, spin: bool = True) -> Pipeline:
        """Open a bundle and create one backend per graph. max_length (default: the bundle's)
        sizes the KV cache; it cannot exceed what the decoder was exported for.

        max_sessions bounds the decoder sessions that threads sharing this Pipeline run at
        once (further calls wait for one). Each holds a KV cache of
        2 x layers x batch x kv_heads x max_length x head_dim values
        (`manifest.model.kv.bytes_for(batch, max_length)`: 0.8 MB per row for the shipped
        model at its 512 positions), allocated on first use and reused.

        spin: onnxruntime's CPU worker threads spin between operators, as by default; a server,
        whose cores its own workers and other requests need, turns it off."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify=verify)
        model = bundle.manifest.model
        if max_length is None:
            max_length = model.max_length
        if not 1 <= max_length <= model.max_length:
            raise ValueError(f"max_length must be in 1..{model.max_length} (the decoder's rotary tables "
                             f"end there; re-export with a larger --max-length), got {max_length}")
        backends = {"decoder": create_backend(bundle.path / bundle.manifest.role("decoder").file, backend=backend,
                                              device=device, threads=threads, spin=spin)}
        return cls(bundle, backends, max_length, device, backend, threads, max_sessions, spin)

    @property
    def manifest(self):
        return self.bundle.manifest

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    @property
    def is_multimodal(self) -> bool:
        return self.manifest.model.family != "llm"

    def __getattr__(self, name: str):
        # The family's own verbs (emu2: generate_image, regress, ...) are the Pipeline's.
        family = self.__dict__.get("family")
        if family is not None and not name.startswith("_"):
            if hasattr(family, name):
                return getattr(family, name)
            raise FamilyVerbError(f"this bundle's model is of family {self.manifest.model.family!r}, which has no "
                                 f"{name!r}" + (" (images need an emu2 bundle: emu-edge export CHECKPOINT, "
                                                "or an emu3 one: emu-edge export-hf EMU3_FOLDER)"
                                                if "image" in name or name in ("regress", "denoise", "autoencode")
                                                else ""))
        raise AttributeError(name)

    def graph(self, role: str):
        """The backend of a graph, created on first use (a captioning app never loads the U-Net)."""
        with self._graph_lock:
            if role not in self.backends:
                spec = self.manifest.role(role)
                self.backends[role] = create_backend(self.bundle.path / spec.file, backend=self.backend_kind,
                                                     device=self.device, threads=self.threads, spin=self.spin)
            return self.backends[role]

    # -- decoder sessions ------------------------------------------------------------------

    def session(self, batch: int = 1, max_length: int | None = None) -> DecoderSession:
        """A new decoder session of `batch` rows, owned by the caller (its KV cache is
        allocated here). The Pipeline's own calls borrow pooled ones instead."""
        return DecoderSession(self.backends["decoder"], self.manifest, batch, max_length or self.max_length)

    def borrow_session(self, batch: int, max_length: int | None = None):
        """`with pipe.borrow_session(2) as session:` a pooled session for one call (of
        max_length positions, default the Pipeline's)."""
        return self._sessions.borrow(batch, max_length or self.max_length)

    # -- the text verbs (every family) -----------------------------------------------------

    def stream_ids(self, rows: list[list[int]], max_new_tokens: int, sampler: Sampler, stop_ids: list[int],
                   visual: np.ndarray | None = None) -> Iterator[list[int | None]]:
        """The text loop over a batch of prompts: at each step, the new token of every row
        (None once a row has stopped; a row's stop token is yielded, then it stops)."""
        if max_new_tokens <= 0:
            return
        text.check_room(max(len(r) for r in rows), max_new_tokens, self.max_length,
                        ", or pass truncate=True to drop the oldest items")
        with self.borrow_session(len(rows)) as session:
            out = text.prefill(session, rows, visual)
            yield from text.loop(session, out, [list(r) for r in rows], max_new_tokens, sampler, stop_ids,
                                 self.family.banned_ids)

    def generate(self, rows: list[list[int]], max_new_tokens: int, sampler: Sampler,
                 stop_ids: list[int], visual: np.ndarray | None = None) -> list[list[int]]:
        """New tokens per row, each row ending at (and including) its first stop id."""
        return text.collect(self.stream_ids(rows, max_new_tokens, sampler, stop_ids, visual), len(rows))

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
                      ignore_eos: bool = False, system: str | None = None, **sampling) -> str:
        """Text out for a prompt: a string, or interleaved items (str, images, video clips)
        for a multimodal family.

        template "auto": images alone are captioned (the plain template), anything with
        text is an instruction ([USER]: ... [ASSISTANT]:). `sampling` as in generate_ids;
        `stop` strings end the answer; `system`: a system prompt, for bundles whose prompt
        layout has one (an Emu3 folder's chat template). max_new_tokens None: the bundle's
        default, capped to what the context leaves (see complete_batch)."""
        return self.complete_batch([items], max_new_tokens, stop, template, truncate, video_frames, ignore_eos,
                                   system, **sampling)[0].text

    def generate_text_batch(self, batch: list, max_new_tokens: int | None = None, stop: list[str] | None = None,
                            template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                            ignore_eos: bool = False, system: str | None = None, **sampling) -> list[str]:
        """generate_text for several prompts at once (one batched decode)."""
        return [c.text for c in self.complete_batch(batch, max_new_tokens, stop, template, truncate, video_frames,
                                                    ignore_eos, system, **sampling)]

    def complete_batch(self, batch: list, max_new_tokens: int | None = None, stop: list[str] | None = None,
                       template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                       ignore_eos: bool = False, system: str | None = None, **sampling) -> list[Completion]:
        """generate_text_batch with each answer's finish reason and token counts. A
        max_new_tokens the caller did not choose is capped to what the context leaves after
        the longest prompt: an answer cut there ends with finish_reason "length"."""
        if not batch:
            raise ValueError("the batch is empty")
        chosen = max_new_tokens is not None
        max_new_tokens = self._max_new_tokens(max_new_tokens)
        checker = StopChecker(stop) if stop else None
        rows, visual = self.family.text_prompts(batch, template, truncate, max_new_tokens, video_frames, system)
        if not chosen:
            max_new_tokens = _fit(max_new_tokens, max(len(r) for r in rows), self.max_length)
        sampler = Sampler(SamplingConfig(**sampling))
        eos = [] if ignore_eos else self.manifest.model.eos_ids()
        new: list[list[int]] = [[] for _ in rows]
        steps = self.stream_ids(rows, max_new_tokens, sampler, eos, visual)
        for tokens in steps:
            for b, token in enumerate(tokens):
                if token is not None:
                    new[b].append(token)
            if checker and all(checker.check(self._decode(n)) is not None for n in new):
                steps.close()  # gives the session back now
                break
        out = []
        for row, ids in zip(rows, new):
            text_ = self._decode(ids)
            cut = checker.check(text_) if checker else None
            stopped = cut is not None or bool(ids and ids[-1] in eos)
            out.append(Completion(text=(text_ if cut is None else text_[:cut]).strip(),
                                  finish_reason="stop" if stopped or len(ids) < max_new_tokens else "length",
                                  prompt_tokens=len(row), completion_tokens=len(ids)))
        return out

    def stream_text(self, items, max_new_tokens: int | None = None, stop: list[str] | None = None,
                    template: str = "auto", truncate: bool = False, video_frames: int | None = None,
                    system: str | None = None, **sampling) -> TextStream:
        """generate_text, yielding the text as it is produced; the stream's finish_reason
        and token counts are set once it ends."""
        chosen = max_new_tokens is not None
        max_new_tokens = self._max_new_tokens(max_new_tokens)
        rows, visual = self.family.text_prompts([items], template, truncate, max_new_tokens, video_frames, system)
        if not chosen:
            max_new_tokens = _fit(max_new_tokens, len(rows[0]), self.max_length)
        eos = self.manifest.model.eos_ids()
        steps = self.stream_ids(rows, max_new_tokens, Sampler(SamplingConfig(**sampling)), eos, visual)
        return TextStream(steps, len(rows[0]), max_new_tokens, self._decode, eos, stop)

    def conversation(self, max_length: int | None = None, system: str | None = None) -> Conversation:
        """A multi-turn chat with its own KV cache; `system`: a system prompt written once,
        at its start (bundles whose prompt layout has one)."""
        return Conversation(self, max_length, system)

    def _decode(self, ids: list[int]) -> str:
        eos = set(self.manifest.model.eos_ids())
        return self.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)

    def _max_new_tokens(self, value: int | None) -> int:
        value = self.manifest.model.generation.get("max_new_tokens", 64) if value is None else value
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {value!r}")
        return int(value)


@dataclass
class Completion:
    """One prompt's answer: its text, why it ended ("stop": EOS or a stop string;
    "length": max_new_tokens reached) and its token counts (what OpenAI's usage reports)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """One answer's text as it is produced: iterate it for the pieces. `completion_tokens`
    counts as it goes; once the stream has ended, `finish_reason` is set ("stop" or
    "length", as in Completion). close() ends it early and gives its session back."""

    def __init__(self, steps: Iterator[list[int | None]], prompt_tokens: int, max_new_tokens: int, decode,
                 eos: list[int], stop: list[str] | None):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._steps, self._max, self._decode, self._eos, self._stop = steps, max_new_tokens, decode, set(eos), stop
        self._ids: list[int] = []
        self._pieces = self._run()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self._steps.close()

    def _tokens(self) -> Iterator[int]:
        for step in self._steps:
            self._ids.append(step[0])
            self.completion_tokens = len(self._ids)
            yield step[0]

    def _run(self) -> Iterator[str]:
        try:
            yield from text.stream_pieces(self._tokens(), self._decode, self._eos, self._stop)
        finally:
            self._steps.close()
        ids = self._ids
        stopped = bool(ids) and ids[-1] in self._eos
        if self._stop and not stopped:
            stopped = StopChecker(self._stop).check(self._decode(ids)) is not None
        self.finish_reason = "stop" if stopped or len(ids) < self._max else "length"


def _fit(default: int, prompt_length: int, max_length: int) -> int:
    """A default max_new_tokens capped to what the context leaves after the prompt (at
    least 1, so that a prompt too long on its own is refused by check_room by name)."""
    return max(1, min(default, max_length - prompt_length + 1))


class ConversationBusyError(RuntimeError):
    """A Conversation was used by a second thread while a turn was running."""


class Conversation:
    """A multi-turn chat that keeps its own KV cache: each turn prefills only its new tokens.

        chat = pipe.conversation()
        chat.ask([image, "what is in the image?"])
        chat.ask(["what colour is the circle?"])     # the image and first turn stay cached

    A Conversation belongs to one thread at a time: a turn started while another is running
    (or a stream is still open) raises ConversationBusyError instead of mixing the caches.
    Threads that chat at once each take their own pipe.conversation().
    """

    def __init__(self, pipe: Pipeline, max_length: int | None = None, system: str | None = None):
        self.pipe = pipe
        self.system = system
        self.session = pipe.session(1, max_length)
        self.history: list[int] = []   # every token in the cache (the repetition penalty reads it)
        self.unfed: list[int] = []     # the last answer's end: sampled, not yet in the cache
        self.turns: list[tuple[list, str]] = []
        self._busy = threading.Lock()

    def ask(self, items, **kwargs) -> str:
        return "".join(self.stream(items, **kwargs)).strip()

    def stream(self, items, max_new_tokens: int | None = None, stop: list[str] | None = None,
               video_frames: int | None = None, **sampling) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise ConversationBusyError("this Conversation is answering in another thread (or an earlier stream is "
                                        "still open): a Conversation belongs to one thread at a time; give each "
                                        "thread its own pipe.conversation()")
        try:
            yield from self._turn(items, max_new_tokens, stop, video_frames, sampling)
        finally:
            self._busy.release()

    def _turn(self, items, max_new_tokens, stop, video_frames, sampling) -> Iterator[str]:
        pipe = self.pipe
        chosen = max_new_tokens is not None
        max_new_tokens = pipe._max_new_tokens(max_new_tokens)
        sampler = Sampler(SamplingConfig(**sampling))
        # The previous answer's unfed end goes in first; the family says how it closes.
        ids, visual = pipe.family.chat_turn(items, video_frames, self.unfed if self.history else None, self.system)
        if not chosen:
            max_new_tokens = _fit(max_new_tokens, len(self.history) + len(ids), self.session.max_length)
        text.check_room(len(self.history) + len(ids), max_new_tokens, self.session.max_length,
                        "; or start a new conversation")
        out = self.session.extend([ids], visual) if self.history else self.session.prefill([ids], visual)
        self.history += ids
        eos = pipe.manifest.model.eos_ids()
        if not eos:
            raise DecoderError("this bundle declares no EOS token, which a conversation needs to close a turn")
        fed = len(self.history)
        yielded: list[int] = []

        def tokens():
            for step in text.loop(self.session, out, [self.history], max_new_tokens, sampler, eos,
                                  pipe.family.banned_ids):
                yielded.append(step[0])
                yield step[0]

        answer = []
        try:
            for piece in text.stream_pieces(tokens(), pipe._decode, set(eos), stop):
                answer.append(piece)
                yield piece
        finally:
            # The cache holds every token but the last one sampled; that one (and, if it
            # was not EOS, an EOS that closes the cut-off turn) goes in with the next turn.
            del self.history[fed:]
            self.history += yielded[:-1]
            last = yielded[-1:] if yielded else []
            self.unfed = last if last and last[0] in eos else last + [eos[0]]
        self.turns.append((list(items) if isinstance(items, (list, tuple)) else [items], "".join(answer)))


def _as_ids(row) -> list[int]:
    return [int(t) for t in row]
