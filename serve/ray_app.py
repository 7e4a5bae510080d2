"""`emu-edge serve --ray`: the same engine and OpenAI routes as a Ray Serve app, for more
than one machine (the `[ray]` extra).

    emu-edge serve --ray --replicas 2 [--bundle DIR] [--port 8000] ...
    emu-edge serve --ray --min-replicas 1 --max-replicas 8 [--target-ongoing-requests N]
    emu-edge serve --ray --ray-address auto ...     # join a running cluster (`ray start`)

Each replica is one Ray actor holding a Pipeline and an Engine (the continuous-batching
step scheduler of serve/engine.py) behind the routes of serve/app.py (OpenAIRoutes), on a
FastAPI app built in the replica (serve.ingress with __serve_build_asgi_app__). Ray's
proxy spreads requests over the replicas; each answer carries the replica that served
it in the `x-emu-edge-replica` header. With --min/--max-replicas Ray's autoscaler adds a
replica when the requests in flight per replica pass --target-ongoing-requests (default:
the rows one replica decodes at once, --max-batch) and removes one when they fall.

Ray binds the machine's address even when given 127.0.0.1, so tests run it inside a
network namespace that has only loopback (`unshare -n`).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from emu_edge.serve.app import OpenAIRoutes
from emu_edge.serve.engine import STOP, drive, is_last
from emu_edge.serve.requests import RequestError

APP_NAME = "emu-edge"


class EngineRoutes(OpenAIRoutes):
    """The routes over an engine in this process: a driver thread runs serve.engine.drive,
    and each request's events come back to its event loop through an asyncio queue."""

    def __init__(self, engine, batch_timeout: float, max_body: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_body = max_body
        self.inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._driver = threading.Thread(target=drive, args=(engine, self.inbox, self._deliver, batch_timeout),
                                        name="emu-edge-engine", daemon=True)
        self._driver.start()

    def app(self) -> FastAPI:
        app = FastAPI()
        for path, name, methods in self.ROUTES:
            app.add_api_route(path, getattr(self, name), methods=methods)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.middleware("http")(self._limit_body)
        return app

    async def _limit_body(self, request: Request, call_next):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            error = RequestError(413, f"the request body is over the limit of {self.max_body} bytes")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    async def health(self, request: Request):
        return PlainTextResponse("ok", headers={"x-emu-edge-replica": self.replica} if self.replica else None)

    def stop(self) -> None:
        self.inbox.put(STOP)

    def _deliver(self, uid: str, event: dict) -> None:
        target = self._streams.get(uid)
        if target is not None:
            loop, events = target
            loop.call_soon_threadsafe(events.put_nowait, event)

    def _enqueue(self, uid: str, job):
        events: asyncio.Queue = asyncio.Queue()
        self._streams[uid] = (asyncio.get_running_loop(), events)
        self.inbox.put(("job", uid, job))
        return self._read(uid, events)

    async def _read(self, uid: str, events: asyncio.Queue):
        try:
            while True:
                event = await events.get()
                yield event
                if is_last(event):
                    return
        finally:
            self._streams.pop(uid, None)

    def _cancel(self, uid: str) -> None:
        self.inbox.put(("cancel", uid))


class Replica:
    """One Ray Serve replica: the bundle loaded once, its engine, the routes."""

    def __init__(self, bundle: str, threads: int | None, max_rows: int, batch_timeout: float, max_body: int,
                 model_ids: list[str], limits, api_key: str | None, max_queue: int, spin: bool = False):
        from ray import serve

        from emu_edge.runtime.pipeline import Pipeline
        from emu_edge.serve.engine import Engine

        replica = serve.get_replica_context().replica_id.unique_id
        engine = Engine(Pipeline.load(bundle, threads=threads, spin=spin), max_rows)
        self.routes = EngineRoutes(engine, batch_timeout, max_body, model_ids, limits, api_key, max_queue,
                                   replica=replica)

    def __serve_build_asgi_app__(self):
        return self.routes.app()

    def __del__(self):
        self.routes.stop()


def build(bundle: str, threads: int | None, max_rows: int, batch_timeout: float, max_body: int, model_ids: list[str],
          limits, api_key: str | None, max_queue: int, replicas: int = 1, min_replicas: int | None = None,
          max_replicas: int | None = None, target_ongoing_requests: float | None = None,
          replica_cpus: float = 1.0, spin: bool = False):
    """The Ray Serve application (Deployment.bind()): `replicas` fixed, or autoscaled
    between min_replicas and max_replicas when either is given."""
    from ray import serve

    if min_replicas is not None or max_replicas is not None:
        low = 1 if min_replicas is None else min_replicas
        scaling = {"autoscaling_config": {"min_replicas": low, "initial_replicas": low,
                                          "max_replicas": max(low, max_replicas or low),
                                          "target_ongoing_requests": target_ongoing_requests or max_rows}}
    else:
        scaling = {"num_replicas": replicas}
    deployment = serve.deployment(serve.ingress()(Replica), name=APP_NAME, max_ongoing_requests=max_queue,
                                  ray_actor_options={"num_cpus": replica_cpus}, **scaling)
    return deployment.bind(bundle, threads, max_rows, batch_timeout, max_body, model_ids, limits, api_key,
                           max_queue, spin)


def run(args, bundle: str, model_ids: list[str], limits) -> int:
    """Start (or join) Ray, run the app on --host:--port, and stay until SIGINT, SIGTERM or
    --stop-after; then the app and a Ray started here are shut down."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Serve: pip install 'emu-edge[ray]' ({e})") from e
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning",
             configure_logging=False, log_to_driver=False)
    stop = threading.Event()
    # After ray.init, which installs handlers of its own that abort the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build(bundle, args.threads, args.max_batch, args.batch_timeout, int(args.max_body_mb * 1024 * 1024),
                    model_ids, limits, args.api_key, args.max_queue, args.replicas, args.min_replicas,
                    args.max_replicas, args.target_ongoing_requests, args.replica_cpus, args.spin)
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving {bundle} as {', '.join(model_ids)} on http://{args.host}:{args.port}/v1 (Ray Serve, "
              f"pid {os.getpid()})", file=sys.stderr, flush=True)
        stop.wait(args.stop_after)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
