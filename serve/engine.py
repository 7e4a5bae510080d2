"""The inference side of the server: a batch of jobs -> a stream of events, one per job
per step. It asks the Pipeline (any family), never a family module.

    events: {"text": piece}                          a streamed piece of an answer
            {"text": piece, "done": {...}}           the last piece, finish reason, usage
            {"images": [png base64, ...], "done": {...}}
            {"error": {"status": 4xx/504, "message"}}
            None                                     nothing new for this job this step

Greedy text jobs share one batched decode (each row's tokens are what it gets alone);
sampled text jobs and image jobs run one after another, each in its own call. A row past
its deadline answers 504 and takes no further part.
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
from emu_edge.serve.requests import ImageJob, TextJob


class DeadlinePassed(Exception):
    pass


def error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


class Engine:
    def __init__(self, pipe):
        self.pipe = pipe

    def run(self, jobs: list) -> Iterator[list[dict | None]]:
        """Events for a batch of jobs: at each step one event (or None) per job."""
        together = [i for i, job in enumerate(jobs) if isinstance(job, TextJob) and job.batchable]
        groups = ([together] if together else []) + [[i] for i, job in enumerate(jobs) if i not in together]
        for group in groups:
            if isinstance(jobs[group[0]], ImageJob):
                yield from self._images(jobs, group[0])
            else:
                yield from self._text(jobs, group)

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
        steps = pipe.stream_ids([ids for _, ids, _, _ in rows], max(limit for *_, limit in rows),
                                Sampler(SamplingConfig(**jobs[rows[0][0]].sampling)), eos,
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

    def _images(self, jobs: list, i: int) -> Iterator[list[dict | None]]:
        job: ImageJob = jobs[i]
        events: list[dict | None] = [None] * len(jobs)

        def progress(done: int, total: int) -> None:
            if time.monotonic() > job.deadline:
                raise DeadlinePassed

        try:
            if time.monotonic() > job.deadline:
                raise DeadlinePassed
            images = self.pipe.image_request(job.prompt, job.images, job.n, job.width, job.height, job.guidance,
                                             job.steps, job.seed, progress=progress)
        except DeadlinePassed:
            events[i] = error(504, "the request ran past the server's timeout")
        except (ValueError, DecoderError) as e:
            events[i] = error(400, str(e))
        else:
            events[i] = {"images": [png_base64(image) for image in images], "done": {"batch": job.n}}
        yield events


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
