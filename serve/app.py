"""The server: OpenAI's routes on LitServe, in front of one inference worker.

    HTTP process (uvicorn)                         inference worker
    EmuSpec routes: check the key, parse and  ──►  EmuAPI.predict: a batch of jobs (up to
    check the body (serve/requests.py), queue      --max-batch, gathered for --batch-timeout)
    the job, read its events, answer / stream ◄──  -> Engine events, one per job per step

    POST /v1/chat/completions    text and image_url parts, stream, usage, finish_reason
    POST /v1/images/generations  prompt, n, size, b64_json (+ seed, guidance, steps)
    POST /v1/images/edits        multipart: image(s) + prompt (families that edit)
    GET  /v1/models, /v1/models/{id}, /metrics (Prometheus); LitServe's /health

A bad request is refused in the HTTP process with a 4xx before it is queued; what only
the model can tell (a prompt longer than the context) comes back as that job's own error
event, so its batch neighbours never see it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import deque

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from emu_edge.serve.requests import (Limits, RequestError, check_model, decode_image, parse_chat,
                                     parse_image_generation)

GENERIC_ID = "emu-edge"


class Metrics:
    """Prometheus metrics of the HTTP process (made there: a registry is per process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("emu_edge_requests", "Requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.queue_depth = Gauge("emu_edge_queue_depth", "Requests queued or running", registry=r)
        self.batch_size = Histogram("emu_edge_batch_size", "Rows in the decode a request ran in",
                                    buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.tokens = Counter("emu_edge_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("emu_edge_tokens_per_second",
                                       "Generated tokens per second of the latest answer", registry=r)
        self.latency = Histogram("emu_edge_request_seconds", "Request latency, arrival to last byte", ["route"],
                                 registry=r)
        self.first_token = Histogram("emu_edge_time_to_first_token_seconds", "Arrival to the first text piece",
                                     registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class EmuSpec(LitSpec):
    def __init__(self, model_ids: list[str], limits: Limits, api_key: str | None = None, max_queue: int = 64):
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.model_ids, self.limits, self.api_key, self.max_queue = model_ids, limits, api_key, max_queue
        self.created = int(time.time())
        self.in_flight = 0
        self._metrics: Metrics | None = None
        self.add_endpoint("/v1/chat/completions", self.chat, ["POST"])
        self.add_endpoint("/v1/images/generations", self.images, ["POST"])
        self.add_endpoint("/v1/images/edits", self.edits, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/models/{model}", self.model, ["GET"])
        self.add_endpoint("/metrics", self.metrics_route, ["GET"])

    @property
    def stream(self):
        return True

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            self._metrics = Metrics()
        return self._metrics

    def __getstate__(self):
        state = super().__getstate__()
        state["_metrics"] = None   # made again in the process that serves
        return state

    # -- routes ----------------------------------------------------------------------------

    async def chat(self, request: Request):
        return await self._route("chat", request, self._chat)

    async def images(self, request: Request):
        return await self._route("images", request, self._images)

    async def edits(self, request: Request):
        return await self._route("edits", request, self._edits)

    async def models(self, request: Request):
        return await self._route("models", request, self._models)

    async def model(self, request: Request, model: str):
        async def one(request):
            check_model({"model": model}, self.model_ids)
            return JSONResponse(self._model_card(model))
        return await self._route("models", request, one)

    async def metrics_route(self, request: Request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def _route(self, name: str, request: Request, handler):
        start = time.monotonic()
        try:
            self._authorize(request)
            response = await handler(request)
        except RequestError as e:
            response = JSONResponse(e.body(), status_code=e.status)
        if not isinstance(response, StreamingResponse):   # a stream counts itself when it ends
            self._count(name, response.status_code, start)
        return response

    def _count(self, route: str, status: int, start: float) -> None:
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.monotonic() - start)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "a wrong or missing API key: send Authorization: Bearer KEY", code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _model_card(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "emu-edge"}

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self.model_ids]})

    # -- chat ------------------------------------------------------------------------------

    async def _chat(self, request: Request):
        body = await self._json(request)
        job = parse_chat(body, self.limits, self.model_ids)
        model = body.get("model") or GENERIC_ID
        start = time.monotonic()
        events = self._submit(job)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            first = await events.__anext__()   # an error before the first piece is still a status code
            if "error" in first:
                await events.aclose()
                raise RequestError(first["error"]["status"], first["error"]["message"])
            return StreamingResponse(self._sse(first, events, ident, created, model, start),
                                     media_type="text/event-stream")
        pieces, done = [], None
        async for event in events:
            if "error" in event:
                raise RequestError(event["error"]["status"], event["error"]["message"])
            if event.get("text") and not pieces:
                self.metrics.first_token.observe(time.monotonic() - start)
            pieces.append(event.get("text", ""))
            done = event.get("done")
        self._record(done, start)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces).strip()},
                         "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": _usage(done)})

    async def _sse(self, first: dict, events, ident: str, created: int, model: str, start: float):
        status = 200

        def chunk(delta: dict, finish=None, usage=None) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            event, shown = first, False
            while True:
                if "error" in event:
                    status = event["error"]["status"]
                    yield f"data: {json.dumps(RequestError(status, event['error']['message']).body())}\n\n"
                    break
                if event.get("text"):
                    if not shown:
                        self.metrics.first_token.observe(time.monotonic() - start)
                        shown = True
                    yield chunk({"content": event["text"]})
                if "done" in event:
                    self._record(event["done"], start)
                    yield chunk({}, event["done"]["finish_reason"], _usage(event["done"]))
                    yield "data: [DONE]\n\n"
                    break
                event = await events.__anext__()
        finally:
            await events.aclose()   # a client gone mid-stream: the job's buffer is dropped
            self._count("chat", status, start)

    def _record(self, done: dict, start: float) -> None:
        self.metrics.batch_size.observe(done.get("batch", 1))
        tokens = done.get("completion_tokens", 0)
        self.metrics.tokens.inc(tokens)
        if tokens:
            self.metrics.tokens_per_second.set(tokens / max(time.monotonic() - start, 1e-9))

    # -- images ----------------------------------------------------------------------------

    async def _images(self, request: Request):
        body = await self._json(request)
        return await self._image_job(parse_image_generation(body, self.limits, self.model_ids))

    async def _edits(self, request: Request):
        try:
            form = await request.form()
        except Exception as e:   # starlette raises several kinds for a malformed body
            raise RequestError(400, f"an edit is a multipart form (image, prompt): {e}") from e
        files = form.getlist("image") + form.getlist("image[]")
        if not files:
            raise RequestError(400, "an edit needs an image: the multipart field 'image'", "image")
        images = []
        for k, upload in enumerate(files):
            if not hasattr(upload, "read"):
                raise RequestError(400, "the field 'image' must be a file", "image")
            images.append(decode_image(await upload.read(), f"image[{k}]", self.limits))
        fields = {k: v for k, v in form.items() if k not in ("image", "image[]")}
        for key in ("n", "seed", "steps"):
            if key in fields:
                fields[key] = _form_number(fields[key], key, int)
        if "guidance" in fields:
            fields["guidance"] = _form_number(fields["guidance"], "guidance", float)
        return await self._image_job(parse_image_generation(fields, self.limits, self.model_ids, images))

    async def _image_job(self, job):
        start = time.monotonic()
        async for event in self._submit(job):
            if "error" in event:
                raise RequestError(event["error"]["status"], event["error"]["message"])
            if "images" in event:
                self.metrics.batch_size.observe(event["done"].get("batch", 1))
                return JSONResponse({"created": int(time.time()),
                                     "data": [{"b64_json": b, "revised_prompt": None} for b in event["images"]]})
        raise RequestError(504, f"no image came back within {time.monotonic() - start:.0f} s")

    # -- the queue -------------------------------------------------------------------------

    def _submit(self, job):
        """Queue a job; its events as they come. Full queue: 429."""
        if self.in_flight >= self.max_queue:
            raise RequestError(429, f"the server is busy: {self.in_flight} requests are queued or running (at most "
                                    f"{self.max_queue}); retry shortly")
        uid = str(uuid.uuid4())
        queue, ready = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=ready)
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self._events(uid, queue, ready)

    async def _events(self, uid: str, queue: deque, ready: asyncio.Event):
        try:
            async for data, status in self.data_streamer(queue, ready, send_status=True):
                if status == LitAPIStatus.ERROR:
                    code = getattr(data, "status_code", 500)
                    message = getattr(data, "detail", None) or "the inference worker failed on this request"
                    yield {"error": {"status": code, "message": str(message)}}
                    return
                if data:
                    yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output


class EmuAPI(ls.LitAPI):
    """The inference worker: loads the bundle once, runs batches of jobs."""

    def __init__(self, bundle: str, threads: int | None, spec: EmuSpec, max_batch: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout, spec=spec)
        self.bundle, self.threads = bundle, threads

    def setup(self, device):
        from emu_edge.runtime.pipeline import Pipeline
        from emu_edge.serve.engine import Engine

        self.engine = Engine(Pipeline.load(self.bundle, threads=self.threads))

    def decode_request(self, request, **kwargs):
        return request   # a job, parsed and checked in the HTTP process

    def batch(self, jobs):
        return list(jobs)

    def predict(self, jobs, **kwargs):
        single = not isinstance(jobs, list)   # --max-batch 1: LitServe hands one job
        for events in self.engine.run([jobs] if single else jobs):
            yield events[0] if single else events

    def unbatch(self, output):
        return output

    def encode_response(self, output, **kwargs):
        yield from output


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def _form_number(value, name: str, kind):
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"{name} must be a number, got {value!r}", name) from e
