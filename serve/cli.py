"""`emu-edge serve`: an OpenAI-compatible server of one bundle, on 127.0.0.1 by default.

    emu-edge serve [--bundle DIR] [--host 127.0.0.1] [--port 8000] [--max-batch N]
                   [--batch-timeout S] [--api-key KEY] [--max-queue N] [--timeout S]

    emu-edge serve --ray [--replicas N | --min-replicas A --max-replicas B] ...   (serve/ray_app.py)

Text requests are batched continuously: one arriving while others decode joins the
running batch at the next step (up to --max-batch rows; more wait for a free row), and
one that ends leaves at once. SIGINT and SIGTERM both stop the HTTP process and the
inference worker (with --ray: the app and the Ray this command started).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from emu_edge.serve.engine import DEFAULT_MAX_ROWS


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", type=Path, help="the bundle to serve (default: the shipped model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_ROWS,
                        help=f"text requests decoded together; more wait for a free row (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--batch-timeout", type=float, default=0.0,
                        help="seconds an idle server waits for more requests to start with the first (default 0: "
                             "a text request joins the running batch at the next step anyway; image requests "
                             "of the same settings that start together share one call)")
    parser.add_argument("--api-key", default=os.environ.get("EMU_EDGE_API_KEY"),
                        help="require Authorization: Bearer KEY on /v1 routes (default: $EMU_EDGE_API_KEY, else none)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests queued or running before new ones get 429 (default 64)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds from arrival until a request answers 504 (default 120)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default 16 MB)")
    parser.add_argument("--max-images", type=int, default=4, help="images in one request (default 4)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="largest input image, in pixels (default 4096 x 4096)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per graph (default: onnxruntime's)")
    parser.add_argument("--spin", action="store_true",
                        help="let onnxruntime's worker threads spin between operators (off by default: under load "
                             "the CPU they burn is what other requests and the server's workers need)")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="stop by itself after this many seconds (tests, timed demos)")
    group = parser.add_argument_group("Ray Serve (--ray, the [ray] extra: replicas, autoscaling, a cluster)")
    group.add_argument("--ray", action="store_true", help="serve as a Ray Serve app (serve/ray_app.py)")
    group.add_argument("--replicas", type=int, default=1, help="replicas, each with its own engine (default 1)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="requests in flight per replica the autoscaler aims at (default: --max-batch)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    group.add_argument("--ray-address", default=None,
                       help="a running Ray cluster to join ('auto': the one `ray start` made here); default: start "
                            "a Ray of its own")


def run(args) -> int:
    from emu_edge.runtime.bundle import Bundle
    from emu_edge.runtime.shipped import default_bundle
    from emu_edge.serve.app import GENERIC_ID
    from emu_edge.serve.requests import Limits

    for name in ("max_batch", "max_queue", "max_images", "max_image_pixels", "replicas"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.batch_timeout < args.timeout:
        raise ValueError("--batch-timeout must be >= 0 and below --timeout")
    if args.min_replicas is not None and args.min_replicas < 0:
        raise ValueError("--min-replicas must be >= 0")
    if args.max_replicas is not None and args.max_replicas < max(1, args.min_replicas or 0):
        raise ValueError("--max-replicas must be >= 1 and >= --min-replicas")
    if args.replica_cpus <= 0:
        raise ValueError("--replica-cpus must be > 0")
    path = args.bundle if args.bundle is not None else default_bundle(log=lambda *a: print(*a, file=sys.stderr))
    bundle = Bundle.open(path)   # a broken bundle fails here, in one line, not in the worker
    name = model_name(bundle)
    model_ids = [GENERIC_ID] + ([name] if name != GENERIC_ID else [])
    limits = Limits(max_images=args.max_images, max_image_pixels=args.max_image_pixels, timeout=args.timeout)
    if args.ray:
        from emu_edge.serve.ray_app import run as run_ray

        return run_ray(args, str(bundle.path), model_ids, limits)

    import litserve as ls

    from emu_edge.serve.app import EmuAPI, EmuSpec

    spec = EmuSpec(model_ids, limits, api_key=args.api_key, max_queue=args.max_queue)
    api = EmuAPI(str(bundle.path), args.threads, spec, args.max_batch, args.batch_timeout, args.spin)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=args.timeout,
                          max_payload_size=int(args.max_body_mb * 1024 * 1024))
    # LitServe stops its workers on SIGINT but orphans them on SIGTERM: make both the same.
    # A shell starts a background job (`emu-edge serve &`, nohup) with SIGINT ignored, and
    # Python keeps it so: without its handler, neither signal nor --stop-after would stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    if args.stop_after is not None:
        timer = threading.Timer(args.stop_after, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
    print(f"serving {bundle.path} as {', '.join(model_ids)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    try:
        server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False,
                   log_level="warning")
    except KeyboardInterrupt:
        pass
    return 0


def model_name(bundle) -> str:
    """The bundle's own model name: the checkpoint or folder it was exported from."""
    source = bundle.manifest.model.source or {}
    return str(source.get("checkpoint") or source.get("llm") or bundle.path.name)


def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (Linux /proc). A server started as a session's
    leader (start_new_session=True) and stopped should leave none: its workers, and Ray's,
    stay in its session."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry))
    return members


def wait_until_serving(url: str, process, seconds: float) -> bool:
    """Whether the server at `url` (a subprocess) answers /health within `seconds`; False
    as soon as the process has ended."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.read() == b"ok":
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False
