"""Load test of `emu-edge serve`: concurrent users through the openai SDK, on loopback.

    python -m benchmarks.load_test [--bundle DIR] [--requests 1000] [--users 1,4,16]
                                   [--threads N] [--spin] [--max-seconds 1500] [--json FILE]

Starts the server (127.0.0.1, a free port; --stop-after as a backstop), warms it up,
then runs three parts, each user a thread with the one shared client:
  captions  caption and VQA requests only, streamed, at each N: aggregate completion
            tokens/s, latency and time to first token (TTFT)
  mix       captions 40%, VQA 30%, chat (a three-message conversation) 20%, image
            generations 10%, at each N: requests/s, tokens/s, p50/p99 latency and TTFT
  long      a caption's latency alone, and sent while a 256-token answer streams
--requests is split over the captions (30%) and mix (70%) parts, evenly over N (at
least 2N a part). The server's resident memory (every process of its session) is read
after the warm-up (every kind once, then 4 requests per user at the most users: graphs,
sessions and memory arenas at their largest shapes) and after the last request. Printed: a table per part and the targets
  16 caption/VQA users: aggregate tokens/s >= 4x one user's
  16 caption/VQA users: p99 TTFT of a caption <= 5x one user's
  a caption sent while a 256-token answer runs: latency <= 2x its latency alone
  errors: 0;  RSS growth: < 5%
Bounded: no request starts after --max-seconds, each has a 120 s client timeout, and the
server is stopped with SIGTERM and checked gone at the end. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from emu_edge import data
from emu_edge.serve.cli import session_processes, wait_until_serving

MIX = {"caption": 0.4, "vqa": 0.3, "chat": 0.2, "image": 0.1}
LONG_TOKENS = 256
LONG_ROUNDS = 5
TARGETS = {"tokens_per_s_ratio": 4.0, "caption_ttft_p99_ratio": 5.0, "caption_under_long_ratio": 2.0,
           "errors": 0, "rss_growth": 0.05}


# -- the server ------------------------------------------------------------------------------


class Server:
    def __init__(self, bundle: Path, threads: int | None, stop_after: float, log: Path, spin: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "emu_edge.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-queue", "256", "--timeout", "300",
                   "--stop-after", str(int(stop_after))]
        if threads is not None:
            command += ["--threads", str(threads)]
        if spin:
            command.append("--spin")
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until_serving(self.url, self.process, 120):
            self.stop()
            raise RuntimeError(f"the server did not start; see {log}")

    def rss_bytes(self) -> int:
        total = 0
        for pid in session_processes(self.process.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server's processes so far."""
        total = 0
        for pid in session_processes(self.process.pid):
            try:
                # the fields after the command name, which may hold spaces: utime and stime are 12th and 13th
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> list[int]:
        """SIGTERM; the processes of its session still alive afterwards (killed)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1.0)
        left = session_processes(self.process.pid)
        if left:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        return left


# -- requests --------------------------------------------------------------------------------


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def job_pool() -> dict[str, list[dict]]:
    """Request bodies by kind: 8 captions, 8 VQA, 8 conversations, 4 image prompts."""
    from PIL import Image

    captions = [data_url(Image.fromarray(s.segments[0].value)) for s in data.captioning("test", 8)]
    vqa = [(data_url(Image.fromarray(s.segments[0].value)), next(g.value for g in s.segments if g.kind == "text"))
           for s in data.vqa("test", 8)]

    def image_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    return {
        "caption": [{"messages": [{"role": "user", "content": [image_part(u)]}]} for u in captions],
        "vqa": [{"messages": [{"role": "user", "content": [image_part(u), {"type": "text", "text": q}]}]}
                for u, q in vqa],
        "chat": [{"messages": [{"role": "user", "content": [image_part(u), {"type": "text", "text": "what is it?"}]},
                               {"role": "assistant", "content": "a shape"},
                               {"role": "user", "content": "what colour is it?"}]} for u in captions],
        "image": [{"prompt": p} for p in ("a red circle", "a blue square", "a green triangle", "a yellow diamond")],
    }


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)


def send(client, kind: str, body: dict, extra: dict | None = None) -> dict:
    """One request; its latency, TTFT (text), completion tokens, or its error."""
    start = time.perf_counter()
    record = {"kind": kind, "start": start}
    try:
        if kind == "image":
            out = client.images.generate(model="emu-edge", size="32x32", response_format="b64_json", n=1,
                                         extra_body={"seed": 0}, **body)
            assert out.data and out.data[0].b64_json
            record["tokens"] = 0
        else:
            stream = client.chat.completions.create(model="emu-edge", stream=True,
                                                    stream_options={"include_usage": True}, **body, **(extra or {}))
            tokens = 0
            for chunk in stream:
                if "ttft" not in record and chunk.choices and chunk.choices[0].delta.content:
                    record["ttft"] = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            record["tokens"] = tokens
    except Exception as e:   # counted: the run's verdict needs every error, not the first
        record["error"] = f"{type(e).__name__}: {e}"[:300]
    record["end"] = time.perf_counter()
    record["latency"] = record["end"] - start
    return record


def run_users(client, pool: dict, weights: dict, users: int, requests: int, deadline: float, seed: int,
              server: Server | None = None) -> dict:
    """`users` threads sending until `requests` have been sent (or the deadline). With the
    server: how busy the machine was, the server's CPU time and this load generator's
    (all its threads) over the wall time and the CPU count."""
    recorder, counter, lock = Recorder(), [0], threading.Lock()
    kinds, p = list(weights), np.array(list(weights.values()))
    p = p / p.sum()

    def user(u: int) -> None:
        rng = np.random.default_rng(seed * 1000 + u)
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= requests:
                    return
                counter[0] += 1
            kind = kinds[rng.choice(len(kinds), p=p)]
            body = pool[kind][rng.integers(len(pool[kind]))]
            recorder.add(send(client, kind, body))

    cpu = (server.cpu_seconds() if server else 0.0, time.process_time())
    start = time.perf_counter()
    with ThreadPoolExecutor(users) as threads:
        list(threads.map(user, range(users)))
    wall = time.perf_counter() - start
    summary = summarize(recorder.records, wall, users)
    if server is not None:
        summary["server_cpu_s"] = server.cpu_seconds() - cpu[0]
        summary["client_cpu_s"] = time.process_time() - cpu[1]
        summary["machine_busy"] = (summary["server_cpu_s"] + summary["client_cpu_s"]) / (wall * os.cpu_count())
    return summary


def quantile(values: list[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def summarize(records: list[dict], wall: float, users: int) -> dict:
    ok = [r for r in records if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    by_kind = {}
    for kind in sorted({r["kind"] for r in records}):
        rs = [r for r in ok if r["kind"] == kind]
        ttft = [r["ttft"] for r in rs if "ttft" in r]
        by_kind[kind] = {"n": len(rs), "latency_p50_ms": _ms(quantile([r["latency"] for r in rs], 0.5)),
                         "latency_p99_ms": _ms(quantile([r["latency"] for r in rs], 0.99)),
                         "ttft_p50_ms": _ms(quantile(ttft, 0.5)), "ttft_p99_ms": _ms(quantile(ttft, 0.99)),
                         "tokens": sum(r["tokens"] for r in rs)}
    errors = [r["error"] for r in records if "error" in r]
    return {"users": users, "requests": len(records), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "errors": len(errors), "error_samples": errors[:5],
            "by_kind": by_kind}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def stream_long(url: str, started: threading.Event, result: dict) -> None:
    """A LONG_TOKENS-token answer, streamed and read as raw server-sent events: the SDK's
    parsing of each chunk would take the load generator's GIL from the caption measured
    beside it (2 cores), which is not the server's doing."""
    body = json.dumps({"model": "emu-edge", "messages": [{"role": "user", "content": "a red circle"}],
                       "max_tokens": LONG_TOKENS, "stream": True, "stream_options": {"include_usage": True}})
    request = urllib.request.Request(f"{url}/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if b'"content": "' in line and b'"content": ""' not in line:
                    started.set()
                if b'"usage": {' in line:
                    result["tokens"] = json.loads(line[len(b"data: "):])["usage"]["completion_tokens"]
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["end"] = time.perf_counter()
    result["latency"] = result["end"] - start
    started.set()


def long_probe(client, pool: dict, url: str) -> dict:
    """A caption's latency alone, then sent once a 256-token answer has started."""
    caption = pool["caption"][0]
    alone = [send(client, "caption", caption) for _ in range(LONG_ROUNDS)]
    under, long_tokens, overlapped, errors = [], [], 0, []
    for _ in range(LONG_ROUNDS):
        started, result = threading.Event(), {}
        thread = threading.Thread(target=stream_long, args=(url, started, result))
        thread.start()
        started.wait(120)
        under.append(send(client, "caption", caption))
        thread.join(300)
        long_tokens.append(result.get("tokens"))
        overlapped += under[-1]["end"] < result.get("end", 0)
        if "error" in result:
            errors.append(result["error"])
    errors += [r["error"] for r in alone + under if "error" in r]
    solo = quantile([r["latency"] for r in alone if "error" not in r], 0.5)
    shared = quantile([r["latency"] for r in under if "error" not in r], 0.5)
    return {"caption_alone_p50_ms": _ms(solo), "caption_under_long_p50_ms": _ms(shared),
            "ratio": None if not solo or shared is None else shared / solo, "long_tokens": long_tokens,
            "captions_done_before_the_long_answer": overlapped, "rounds": LONG_ROUNDS, "errors": len(errors),
            "error_samples": errors[:3]}


# -- the run ---------------------------------------------------------------------------------


def run(bundle: Path, requests: int, users: list[int], threads: int | None, max_seconds: float, log: Path,
        spin: bool = False) -> dict:
    import openai

    pool = job_pool()
    server = Server(bundle, threads, max_seconds + 300, log, spin)
    left: list[int] = []
    try:
        deadline = time.monotonic() + max_seconds
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        # Every kind once, then a burst at the most users: the graphs, sessions and the
        # memory arenas reach their largest shapes before the first RSS reading.
        warm = [send(client, kind, bodies[0]) for kind, bodies in pool.items()]
        warm = summarize(warm, 1.0, 1)["errors"] + run_users(client, pool, MIX, max(users), 4 * max(users),
                                                             deadline, seed=99)["errors"]
        rss_before = server.rss_bytes()
        per_part = {"captions": max(1, int(0.3 * requests) // len(users)), "mix": max(1, int(0.7 * requests)
                                                                                   // len(users))}
        captions = [run_users(client, pool, {"caption": 0.5, "vqa": 0.5}, n, max(per_part["captions"], 2 * n),
                              deadline, seed=n, server=server) for n in users]
        mix = [run_users(client, pool, MIX, n, max(per_part["mix"], 2 * n), deadline, seed=100 + n, server=server)
               for n in users]
        probe = long_probe(client, pool, f"{server.url}/v1")
        rss_after = server.rss_bytes()
        sent = sum(p["requests"] for p in captions + mix) + 3 * LONG_ROUNDS
    finally:
        left = server.stop()
    result = {"bundle": str(bundle), "users": users, "threads": threads, "spin": spin, "requests_sent": sent,
              "deadline_reached": time.monotonic() > deadline, "warm_up_errors": warm, "captions": captions, "mix": mix,
              "long": probe, "rss_before_mb": rss_before / 1e6, "rss_after_mb": rss_after / 1e6,
              "rss_growth": (rss_after - rss_before) / rss_before, "processes_left": left}
    result["targets"] = verdicts(result)
    return result


def verdicts(r: dict) -> dict:
    def at(part: str, n: int) -> dict | None:
        return next((p for p in r[part] if p["users"] == n), None)

    one, many = at("captions", 1), at("captions", 16)
    out = {}
    if one and many:
        out["tokens_per_s_ratio"] = many["tokens_per_s"] / one["tokens_per_s"]
        ttft_one = one["by_kind"].get("caption", {}).get("ttft_p99_ms")
        ttft_many = many["by_kind"].get("caption", {}).get("ttft_p99_ms")
        out["caption_ttft_p99_ratio"] = ttft_many / ttft_one if ttft_one and ttft_many else None
    out["caption_under_long_ratio"] = r["long"]["ratio"]
    out["errors"] = sum(p["errors"] for p in r["captions"] + r["mix"]) + r["long"]["errors"]
    out["rss_growth"] = r["rss_growth"]
    met = {}
    for key, value in out.items():
        limit = TARGETS[key]
        met[key] = None if value is None else (value >= limit if key == "tokens_per_s_ratio" else
                                               value <= limit if key == "errors" else value < limit
                                               if key == "rss_growth" else value <= limit)
    return {"values": out, "met": met}


def markdown(r: dict) -> str:
    lines = [f"{r['requests_sent']} requests, server RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB "
             f"({100 * r['rss_growth']:+.1f}%), processes left after SIGTERM: {len(r['processes_left'])}", ""]
    for part in ("captions", "mix"):
        lines += [f"**{part}**", "", "| users | requests | req/s | tokens/s | machine busy (server + client CPU) | "
                  "kind | p50 ms | p99 ms | TTFT p50 | TTFT p99 | errors |",
                  "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for p in r[part]:
            for kind, k in p["by_kind"].items():
                cells = [_fmt(k[key]) for key in ("latency_p50_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p99_ms")]
                busy = (f"{100 * p['machine_busy']:.0f}% ({p['server_cpu_s']:.1f} + {p['client_cpu_s']:.1f} s)"
                        if "machine_busy" in p else "-")
                lines.append(f"| {p['users']} | {p['requests']} | {p['requests_per_s']:.1f} | {p['tokens_per_s']:.0f} "
                             f"| {busy} | {kind} | " + " | ".join(cells) + f" | {p['errors']} |")
        lines.append("")
    g = r["long"]
    lines += [f"caption alone p50 {_fmt(g['caption_alone_p50_ms'])} ms; sent while a {LONG_TOKENS}-token answer "
              f"streams p50 {_fmt(g['caption_under_long_p50_ms'])} ms ({g['captions_done_before_the_long_answer']}/"
              f"{g['rounds']} finished before it)", "", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for key, value in r["targets"]["values"].items():
        lines.append(f"| {key} | {_fmt(value, 3)} | {TARGETS[key]} | {r['targets']['met'][key]} |")
    return "\n".join(lines)


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    from emu_edge.runtime.shipped import default_bundle

    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="default: the shipped model")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--users", default="1,4,16", help="concurrent users per part, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="the server's CPU threads per graph")
    parser.add_argument("--spin", action="store_true", help="the server's onnxruntime threads spin (serve --spin)")
    parser.add_argument("--max-seconds", type=float, default=1500, help="no request starts after this")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, default=Path("load_test_server.log"), help="the server's output")
    args = parser.parse_args(argv)
    bundle = args.bundle or default_bundle(log=lambda *a: print(*a, file=sys.stderr))
    result = run(Path(bundle), args.requests, [int(n) for n in args.users.split(",")], args.threads,
                 args.max_seconds, args.log, args.spin)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0 if all(v is not False for v in result["targets"]["met"].values()) and not result["processes_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
