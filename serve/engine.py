"""The inference side of the server: jobs in, events out, through one step scheduler. It
asks the Pipeline (any family), never a family module.

    engine = Engine(pipe, max_rows=16)
    engine.submit(key, job)        a TextJob or an ImageJob, queued until the next boundary
    engine.cancel(key)             its client has gone: it leaves at once, with no event
    engine.step() -> [(key, event), ...]   one step boundary (see below)
    drive(engine, inbox, deliver)  the loop a server runs: jobs from a queue, events out

    events: {"text": piece}                          a streamed piece of an answer
            {"text": piece, "done": {...}}           the last piece, finish reason, usage
            {"images": [png base64, ...], "done": {...}}
            {"error": {"status": 4xx/500/504, "message"}}
    A job's last event is the one with "done" or "error" (is_last).

Text jobs are batched continuously. The engine owns one DecoderSession of max_rows rows;
a row is one request. At each step boundary:
  1. the tokens sampled at the last boundary are fed to every busy row in ONE graph run
     over the first k rows (k = the highest busy row + 1: rows above it do not run);
  2. waiting text jobs take the lowest free rows: each prompt is prefilled into its row
     alone (DecoderSession.prefill_row: batch 1, in place; the others wait one prefill);
  3. every busy row samples its next token (rows of the same settings in one call, each
     drawing from its own seed's generator) and streams its piece; a row that ends
     (EOS, a stop string, max_tokens, its deadline, a cancel) is freed at once.
A free row below a busy one still runs in step 1, fed a dummy token and kept empty
(DecoderSession.free_row): one row's compute, cheaper than moving a busy row's cache, and
new requests fill the lowest free row first, so such holes close. Each request's tokens
are what it gets alone (tested, greedy and sampled): its cache is its own prompt's
batch-1 prefill, its steps see only its own row, and its sampler draws from its own
generator.

Image jobs (Emu2's regression and denoising, Emu3's image tokens) run whole, one batch at
a time on a thread of their own, so text rows keep stepping meanwhile: jobs of the same
size, guidance and steps share one image_requests call (up to MAX_IMAGE_ROWS images);
each gets the pixels it gets alone. A call that fails as a whole is retried one job at a
time, so that an error is only its own job's.
"""

from __future__ import annotations

import base64
import io
import queue
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

import numpy as np

from emu_edge.runtime import text
from emu_edge.runtime.decoder import DecoderError
from emu_edge.runtime.pipeline import _fit
from emu_edge.runtime.sampling import Sampler, SamplingConfig
from emu_edge.serve.requests import ImageJob, TextJob

# Images one batched call draws (emu3's guidance doubles its decoder rows).
MAX_IMAGE_ROWS = 8
# Text requests decoded together by default.
DEFAULT_MAX_ROWS = 16

TIMEOUT_MESSAGE = "the request ran past the server's timeout"


class DeadlinePassed(Exception):
    pass


def error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


def failed(e: Exception) -> dict:
    return error(500, f"the inference worker failed on this request: {e}")


def is_last(event: dict) -> bool:
    return "done" in event or "error" in event


@dataclass
class _Row:
    """A text request in its decoder row."""

    key: Hashable
    job: TextJob
    slot: int
    prompt_tokens: int
    limit: int                          # max new tokens
    pieces: text.PieceDecoder
    history: list[int]                  # prompt + answer (the repetition penalty reads it)
    settings: tuple                     # sampling settings but the seed: rows that sample together
    generator: np.random.Generator | None
    logits: np.ndarray                  # [V] at its last position: what it samples next
    count: int = 0
    last: int = 0                       # sampled, not yet fed
    peak: int = 1                       # most rows it shared a step with


@dataclass
class _ImageBatch:
    jobs: list                          # [(key, ImageJob)]
    future: Future
    cancelled: set = field(default_factory=set)


class Engine:
    def __init__(self, pipe, max_rows: int = DEFAULT_MAX_ROWS):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        self.pipe = pipe
        self.max_rows = max_rows
        self.session = pipe.session(max_rows)   # the running batch's cache, allocated once
        for slot in range(max_rows):
            self.session.free_row(slot)
        self.rows: list[_Row | None] = [None] * max_rows
        self.waiting: deque = deque()           # (key, TextJob) not yet in a row
        self.waiting_images: deque = deque()    # (key, ImageJob)
        self.images: _ImageBatch | None = None
        self._samplers: dict[tuple, Sampler] = {}
        self._tokens = np.zeros(max_rows, np.int64)
        self._eos = pipe.manifest.model.eos_ids()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="emu-edge-images")
        self.on_images_done: Callable[[], None] | None = None   # wakes a driver waiting for work

    # -- the interface -----------------------------------------------------------------------

    def submit(self, key: Hashable, job) -> None:
        (self.waiting if isinstance(job, TextJob) else self.waiting_images).append((key, job))

    def cancel(self, key: Hashable) -> None:
        for waiting in (self.waiting, self.waiting_images):
            for item in [item for item in waiting if item[0] == key]:
                waiting.remove(item)
        for row in self.rows:
            if row is not None and row.key == key:
                self._free(row)
        if self.images is not None and any(k == key for k, _ in self.images.jobs):
            self.images.cancelled.add(key)

    @property
    def decoding(self) -> bool:
        """Whether step() has text to run now (else it only collects finished images)."""
        return bool(self.waiting) or any(row is not None for row in self.rows)

    @property
    def busy(self) -> bool:
        return self.decoding or bool(self.waiting_images) or self.images is not None

    def step(self) -> list[tuple[Hashable, dict]]:
        events: list[tuple[Hashable, dict]] = []
        self._images_step(events)
        self._decode(events)
        self._admit(events)
        self._sample(events)
        return events

    def run(self, jobs: list) -> Iterator[list[dict | None]]:
        """Jobs submitted together, keyed by their index; at each step one event (or None)
        per job, until every job has had its last event."""
        for i, job in enumerate(jobs):
            self.submit(i, job)
        left = set(range(len(jobs)))
        while left:
            if not self.decoding and self.images is not None:
                self.images.future.exception()   # waits for the image batch
            events: list[dict | None] = [None] * len(jobs)
            for key, event in self.step():
                if key in left:
                    events[key] = event
                    if is_last(event):
                        left.discard(key)
            yield events

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- text --------------------------------------------------------------------------------

    def _prompt(self, job: TextJob) -> tuple[list[int], np.ndarray | None, int]:
        """(ids, visual embeddings, max new tokens) of a chat job; ValueError or
        DecoderError if it cannot run."""
        pipe = self.pipe
        default = pipe._max_new_tokens(None)
        if len(job.turns) == 1:
            # One message: exactly what generate_text makes of it (an image alone is captioned).
            rows, visual = pipe.family.text_prompts([job.turns[0][0]], "auto", False, default, None, job.system)
            ids = rows[0]
        else:
            ids, visual = pipe.family.chat_prompt(job.turns, job.system)
        limit = job.max_tokens or _fit(default, len(ids), pipe.max_length)
        text.check_room(len(ids), limit, pipe.max_length)
        return ids, visual, limit

    def _admit(self, events: list) -> None:
        while self.waiting and None in self.rows:
            key, job = self.waiting.popleft()
            if time.monotonic() > job.deadline:
                events.append((key, error(504, TIMEOUT_MESSAGE)))
                continue
            slot = self.rows.index(None)
            try:
                ids, visual, limit = self._prompt(job)
                out = self.session.prefill_row(slot, ids, visual)
            except (ValueError, DecoderError) as e:
                self.session.free_row(slot)
                events.append((key, error(400, str(e))))
                continue
            except Exception as e:   # this job's own failure: the others go on
                self.session.free_row(slot)
                events.append((key, failed(e)))
                continue
            settings = tuple(sorted((k, v) for k, v in job.sampling.items() if k != "seed"))
            if settings not in self._samplers:
                self._samplers[settings] = Sampler(SamplingConfig(**dict(settings)))
            generator = np.random.default_rng(job.sampling.get("seed")) if job.sampling.get("do_sample") else None
            self.rows[slot] = _Row(key, job, slot, len(ids), limit,
                                   text.PieceDecoder(self.pipe._decode, set(self._eos), job.stop), list(ids),
                                   settings, generator, out.logits[0])

    def _sample(self, events: list) -> None:
        groups: dict[tuple, list[_Row]] = {}
        for row in self.rows:
            if row is not None:
                groups.setdefault(row.settings, []).append(row)
        banned = self.pipe.family.banned_ids
        now = time.monotonic()
        for settings, group in groups.items():
            generators = [row.generator for row in group] if group[0].generator is not None else None
            try:
                tokens = text.sample(self._samplers[settings], np.stack([row.logits for row in group]),
                                     [row.history for row in group], banned, generators=generators).tolist()
            except Exception as e:   # (NaN logits): these rows end, the others go on
                for row in group:
                    events.append((row.key, failed(e)))
                    self._free(row)
                continue
            for row, token in zip(group, tokens):
                row.count += 1
                row.history.append(token)
                row.last = token
                piece = row.pieces.push(token)
                if row.pieces.stopped or row.count >= row.limit:
                    events.append((row.key, {"text": piece + row.pieces.finish(), "done": {
                        "finish_reason": "stop" if row.pieces.stopped else "length",
                        "prompt_tokens": row.prompt_tokens, "completion_tokens": row.count, "batch": row.peak}}))
                    self._free(row)
                elif now > row.job.deadline:
                    events.append((row.key, error(504, TIMEOUT_MESSAGE)))
                    self._free(row)
                elif piece:
                    events.append((row.key, {"text": piece}))

    def _decode(self, events: list) -> None:
        """Feed every busy row its last sampled token: one run over the first k rows."""
        busy = [row for row in self.rows if row is not None]
        if not busy:
            return
        k = busy[-1].slot + 1
        tokens = self._tokens[:k]
        for row in busy:
            tokens[row.slot] = row.last
            row.peak = max(row.peak, len(busy))
        try:
            out = self.session.step(tokens, check=False, rows=k)
        except Exception as e:   # none of the batch can go on; the server does
            for row in busy:
                events.append((row.key, failed(e)))
                self._free(row)
            return
        for row in busy:
            row.logits = out.logits[row.slot]

    def _free(self, row: _Row) -> None:
        self.rows[row.slot] = None
        self.session.free_row(row.slot)

    # -- images ------------------------------------------------------------------------------

    def _images_step(self, events: list) -> None:
        batch = self.images
        if batch is not None and batch.future.done():
            self.images = None
            try:
                done = batch.future.result()
            except Exception as e:   # not a job's own error (those come back as events)
                done = [(key, failed(e)) for key, _ in batch.jobs]
            events.extend((key, event) for key, event in done if key not in batch.cancelled)
        if self.images is None and self.waiting_images:
            self._start_images()

    def _start_images(self) -> None:
        """The first waiting image job and those of its settings behind it, as one call."""
        first = self.waiting_images[0][1]
        jobs, rows = [], 0
        for item in list(self.waiting_images):
            job = item[1]
            if _image_settings(job) == _image_settings(first) and rows + job.n <= max(MAX_IMAGE_ROWS, first.n):
                jobs.append(item)
                rows += job.n
                self.waiting_images.remove(item)
        future = self._executor.submit(self._image_call, jobs)
        self.images = _ImageBatch(jobs, future)
        if self.on_images_done is not None:
            future.add_done_callback(lambda _: self.on_images_done())

    def _image_call(self, jobs: list) -> list[tuple[Hashable, dict]]:
        """One batched call for image jobs of the same settings (on the image thread); a job
        past its deadline answers 504 (the call stops once every job is past it)."""
        first = jobs[0][1]

        def progress(done: int, total: int) -> None:
            if all(time.monotonic() > job.deadline for _, job in jobs):
                raise DeadlinePassed

        try:
            progress(0, 1)
            out = self.pipe.image_requests([(job.prompt, job.images, job.n, job.seed) for _, job in jobs],
                                           first.width, first.height, first.guidance, first.steps, progress)
        except DeadlinePassed:
            return [(key, error(504, TIMEOUT_MESSAGE)) for key, _ in jobs]
        except (ValueError, DecoderError) as e:
            if len(jobs) > 1:
                return [event for job in jobs for event in self._image_call([job])]
            return [(jobs[0][0], error(400, str(e)))]
        rows = sum(job.n for _, job in jobs)
        now = time.monotonic()
        return [(key, error(504, TIMEOUT_MESSAGE) if now > job.deadline else
                 {"images": [png_base64(image) for image in images], "done": {"batch": rows}})
                for (key, job), images in zip(jobs, out)]


def _image_settings(job: ImageJob) -> tuple:
    return job.width, job.height, job.guidance, job.steps


# -- the loop a server runs ----------------------------------------------------------------


STOP = ("stop",)
WAKE = ("wake",)


def drive(engine: Engine, inbox: queue.Queue, deliver: Callable[[Hashable, dict], None],
          batch_timeout: float = 0.0) -> None:
    """Run the engine until STOP comes through `inbox`: ("job", key, job) and
    ("cancel", key) items go in at step boundaries, and deliver(key, event) gets every
    event. With nothing to step it blocks on the inbox (an image batch that ends puts
    WAKE there); an idle engine that gets a job waits up to batch_timeout for more, so
    that requests sent together start together."""
    engine.on_images_done = lambda: inbox.put(WAKE)
    while True:
        items = [] if engine.decoding else [inbox.get()]
        if items and items[0][0] == "job" and not engine.busy and batch_timeout > 0:
            end = time.monotonic() + batch_timeout
            while (left := end - time.monotonic()) > 0:
                try:
                    items.append(inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is STOP:
                engine.close()
                return
            if item[0] == "job":
                engine.submit(item[1], item[2])
            elif item[0] == "cancel":
                engine.cancel(item[1])
        for key, event in engine.step():
            deliver(key, event)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
