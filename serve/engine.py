"""The inference side of the server: a batch of jobs -> a stream of events, one per job
per step. It asks the Pipeline (any family), never a family module.

    events: {"text": piece}                          a streamed piece of an answer
            {"text": piece, "done": {...}}           the last piece, finish reason, usage
            {"images": [png base64, ...], "done": {...}}
            {"error": {"status": 4xx/504, "message"}}
            None                                     nothing new for this job this step

Jobs of the same settings share one batched call (batch_groups): text jobs one decode,
image jobs one image_requests call; each job's tokens and images are what it gets alone
(a sampled job draws from a generator of its own seed). A row past its deadline answers
504 and takes no further part.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Iterator

import numpy as np

from emu_edge.runtime import text
from emu_edge.runtime.decoder import DecoderError
from emu_edge.runtime.pipeline import _fit
from emu_edge.runtime.sampling import Sampler, SamplingConfig
from emu_edge.serve.requests import TextJob


# Images one batched call draws (emu3's guidance doubles its decoder rows).
MAX_IMAGE_ROWS = 8


class DeadlinePassed(Exception):
    pass


def error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


class Engine:
    def __init__(self, pipe):
        self.pipe = pipe

    def run(self, jobs: list) -> Iterator[list[dict | None]]:
        """Events for a batch of jobs: at each step one event (or None) per job."""
        for kind, group in batch_groups(jobs):
            yield from (self._images(jobs, group) if kind == "image" else self._text(jobs, group))

    # -- text ------------------------------------------------------------------------------

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

    def _text(self, jobs: list, group: list[int]) -> Iterator[list[dict | None]]:
        pipe = self.pipe
        events: list[dict | None] = [None] * len(jobs)
        rows = []   # (job index, ids, visual, limit)
        for i in group:
            try:
                rows.append((i, *self._prompt(jobs[i])))
            except (ValueError, DecoderError) as e:
                events[i] = error(400, str(e))
        if any(e is not None for e in events):
            yield events
        if not rows:
            return
        eos = pipe.manifest.model.eos_ids()
        visuals = [v for _, _, v, _ in rows if v is not None]
        # The group shares its settings; each row draws from a generator of its own seed.
        settings = {k: v for k, v in jobs[rows[0][0]].sampling.items() if k != "seed"}
        sampler = Sampler(SamplingConfig(**settings), groups=[(jobs[i].sampling.get("seed"), 1) for i, *_ in rows])
        steps = pipe.stream_ids([ids for _, ids, _, _ in rows], max(limit for *_, limit in rows), sampler, eos,
                                np.concatenate(visuals) if visuals else None)
        decoders = [text.PieceDecoder(pipe._decode, set(eos), jobs[i].stop) for i, *_ in rows]
        counts = [0] * len(rows)
        done = [False] * len(rows)
        try:
            for tokens in steps:
                events = [None] * len(jobs)
                now = time.monotonic()
                for r, (i, ids, _, limit) in enumerate(rows):
                    if done[r] or tokens[r] is None:
                        continue
                    counts[r] += 1
                    row = decoders[r]
                    piece = row.push(tokens[r])
                    if row.stopped or counts[r] >= limit:
                        done[r] = True
                        events[i] = {"text": piece + row.finish(),
                                     "done": {"finish_reason": "stop" if row.stopped else "length",
                                              "prompt_tokens": len(ids), "completion_tokens": counts[r],
                                              "batch": len(rows)}}
                    elif now > jobs[i].deadline:
                        done[r] = True
                        events[i] = error(504, "the request ran past the server's timeout")
                    elif piece:
                        events[i] = {"text": piece}
                yield events
                if all(done):
                    break
        finally:
            steps.close()   # the session goes back to the pool

    # -- images ----------------------------------------------------------------------------

    def _images(self, jobs: list, group: list[int]) -> Iterator[list[dict | None]]:
        """One batched call for a group of image jobs of the same settings; a job past its
        deadline answers 504 (the call stops once every job is past it). A group that fails
        as a whole is retried one job at a time, so that the error is only its own."""
        events: list[dict | None] = [None] * len(jobs)
        first = jobs[group[0]]

        def progress(done: int, total: int) -> None:
            if all(time.monotonic() > jobs[i].deadline for i in group):
                raise DeadlinePassed

        try:
            progress(0, 1)
            out = self.pipe.image_requests([(jobs[i].prompt, jobs[i].images, jobs[i].n, jobs[i].seed) for i in group],
                                           first.width, first.height, first.guidance, first.steps, progress)
        except DeadlinePassed:
            for i in group:
                events[i] = error(504, "the request ran past the server's timeout")
        except (ValueError, DecoderError) as e:
            if len(group) > 1:
                for i in group:
                    yield from self._images(jobs, [i])
                return
            events[group[0]] = error(400, str(e))
        else:
            rows = sum(jobs[i].n for i in group)
            now = time.monotonic()
            for i, images in zip(group, out):
                events[i] = (error(504, "the request ran past the server's timeout") if now > jobs[i].deadline else
                             {"images": [png_base64(image) for image in images], "done": {"batch": rows}})
        yield events


def batch_groups(jobs: list) -> list[tuple[str, list[int]]]:
    """Jobs that can share one call: text jobs of the same sampling settings (each sampled
    row with its own seed's generator), image jobs of the same size, guidance and steps
    (up to MAX_IMAGE_ROWS images a call). In arrival order of each group's first job."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, job in enumerate(jobs):
        if isinstance(job, TextJob):
            key = ("text",) + tuple(sorted((k, v) for k, v in job.sampling.items() if k != "seed"))
        else:
            key = ("image", job.width, job.height, job.guidance, job.steps)
        runs = groups.setdefault(key, [[]])
        if key[0] == "image" and runs[-1] and sum(jobs[j].n for j in runs[-1]) + job.n > MAX_IMAGE_ROWS:
            runs.append([])
        runs[-1].append(i)
    return sorted(((key[0], run) for key, runs in groups.items() for run in runs), key=lambda g: g[1][0])


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
