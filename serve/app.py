"""The server: OpenAI's routes on LitServe, in front of one inference worker.

    HTTP process (uvicorn)                         inference worker
    EmuSpec routes: check the key, parse and  ──►  StepLoop: jobs go to the engine's step
    check the body (serve/requests.py), queue      scheduler at step boundaries (text rows
    the job, read its events, answer / stream ◄──  join the running decode), each event
                                                   back as soon as its step ends

    POST /v1/chat/completions    text and image_url parts, stream, usage, finish_reason
    POST /v1/images/generations  prompt, n, size, b64_json (+ seed, guidance, steps)
    POST /v1/images/edits        multipart: image(s) + prompt (families that edit)
    GET  /v1/models, /v1/models/{id}, /metrics (Prometheus); LitServe's /health

The routes (OpenAIRoutes) know nothing of LitServe: EmuSpec queues through LitServe's
request queue, serve/ray_app.py through an engine in its own replica. A bad request is
refused in the HTTP process with a 4xx before it is queued; what only the model can tell
(a prompt longer than the context) comes back as that job's own error event, so the
other requests never see it. A client that hangs up cancels its job: its row is freed at
the next step boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections import deque

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.loops.base import LitLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from emu_edge.serve.engine import STOP, drive, is_last
from emu_edge.serve.requests import (Cancel, Limits, RequestError, check_model, decode_image, parse_chat,
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
        self.batch_size = Histogram("emu_edge_batch_size", "The most rows a request shared a step (or image call) with",
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


class OpenAIRoutes:
    """OpenAI's routes over a queue of jobs. A subclass says how a job reaches an engine
    (_enqueue: -> its events, an async iterator) and how a job is called off (_cancel)."""

    ROUTES = (("/v1/chat/completions", "chat", ["POST"]), ("/v1/images/generations", "images", ["POST"]),
              ("/v1/images/edits", "edits", ["POST"]), ("/v1/models", "models", ["GET"]),
              ("/v1/models/{model}", "model", ["GET"]), ("/metrics", "metrics_route", ["GET"]))

    def __init__(self, model_ids: list[str], limits: Limits, api_key: str | None = None, max_queue: int = 64,
                 replica: str | None = None):
        self.model_ids, self.limits, self.api_key, self.max_queue = model_ids, limits, api_key, max_queue
        self.replica = replica   # sent as x-emu-edge-replica where several serve one address
        self.created = int(time.time())
        self.in_flight = 0
        self._metrics: Metrics | None = None

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            self._metrics = Metrics()
        return self._metrics

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
        if self.replica is not None:
            response.headers["x-emu-edge-replica"] = self.replica
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
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        return self._events(uid, self._enqueue(uid, job))

    async def _events(self, uid: str, events):
        ended = False
        try:
            async for event in events:
                ended = is_last(event)
                yield event
                if ended:
                    return
        finally:
            await events.aclose()
            if not ended:   # the client has gone (or the route stopped reading): free its row
                self._cancel(uid)
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)

    def _enqueue(self, uid: str, job):
        raise NotImplementedError

    def _cancel(self, uid: str) -> None:
        raise NotImplementedError


class EmuSpec(OpenAIRoutes, LitSpec):
    """The routes on LitServe: jobs through its request queue to the inference worker."""

    def __init__(self, model_ids: list[str], limits: Limits, api_key: str | None = None, max_queue: int = 64):
        LitSpec.__init__(self)
        OpenAIRoutes.__init__(self, model_ids, limits, api_key, max_queue)
        self.api_path = "/v1/chat/completions"
        for path, name, methods in self.ROUTES:
            self.add_endpoint(path, getattr(self, name), methods)

    @property
    def stream(self):
        return True

    def __getstate__(self):
        state = super().__getstate__()
        state["_metrics"] = None   # made again in the process that serves
        return state

    def _enqueue(self, uid: str, job):
        buffer, ready = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=buffer, event=ready)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self._worker_events(uid, buffer, ready)

    async def _worker_events(self, uid: str, buffer: deque, ready: asyncio.Event):
        try:
            async for data, status in self.data_streamer(buffer, ready, send_status=True):
                if status == LitAPIStatus.ERROR:
                    code = getattr(data, "status_code", 500)
                    message = getattr(data, "detail", None) or "the inference worker failed on this request"
                    yield {"error": {"status": code, "message": str(message)}}
                    return
                if data:
                    yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)

    def _cancel(self, uid: str) -> None:
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), Cancel()))

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output


class StepLoop(LitLoop):
    """The inference worker's loop: jobs from LitServe's request queue go to the engine at
    step boundaries (serve.engine.drive), and each event goes back to its request as soon
    as its step ends. A reader thread turns the queue into drive's inbox."""

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner):
        inbox: queue.Queue = queue.Queue()
        streams: dict[str, int] = {}   # uid -> the HTTP process's response queue

        def read() -> None:
            while True:
                try:
                    item = request_queue.get()
                except (EOFError, OSError):   # the server's manager has gone
                    item = None
                if item is None or item[1] is None:   # LitServe's stop sentinel
                    inbox.put(STOP)
                    return
                response_queue_id, uid, _, job = item
                if isinstance(job, Cancel):
                    inbox.put(("cancel", uid))
                else:
                    streams[uid] = response_queue_id
                    inbox.put(("job", uid, job))

        def deliver(uid: str, event: dict) -> None:
            response_queue_id = streams.get(uid)
            if response_queue_id is None:
                return
            self.put_response(transport, response_queue_id, uid, json.dumps(event), LitAPIStatus.OK,
                              LoopResponseType.STREAMING)
            if is_last(event):
                del streams[uid]
                self.put_response(transport, response_queue_id, uid, "", LitAPIStatus.FINISH_STREAMING,
                                  LoopResponseType.STREAMING)

        threading.Thread(target=read, name="emu-edge-requests", daemon=True).start()
        drive(lit_api.engine, inbox, deliver, lit_api.batch_timeout)


class EmuAPI(ls.LitAPI):
    """The inference worker: loads the bundle once; StepLoop runs its engine."""

    def __init__(self, bundle: str, threads: int | None, spec: EmuSpec, max_rows: int, batch_timeout: float,
                 spin: bool = False):
        super().__init__(batch_timeout=batch_timeout, spec=spec, loop=StepLoop())
        self.bundle, self.threads, self.max_rows, self.spin = bundle, threads, max_rows, spin

    def setup(self, device):
        from emu_edge.runtime.pipeline import Pipeline
        from emu_edge.serve.engine import Engine

        self.engine = Engine(Pipeline.load(self.bundle, threads=self.threads, spin=self.spin), self.max_rows)

    def predict(self, x, **kwargs):
        raise NotImplementedError("StepLoop runs the engine; LitServe's own loops are not used")


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def _form_number(value, name: str, kind):
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"{name} must be a number, got {value!r}", name) from e
