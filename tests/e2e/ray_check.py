"""Run inside a loopback-only network namespace by test_serve_ray.py (Ray binds the
machine's address even when given 127.0.0.1; in `unshare -n` that address is loopback):

    unshare -n sh -c 'ip link set lo up && python ray_check.py --bundle DIR --out FILE'

Starts `emu-edge serve --ray --replicas 2` in a session of its own, sends concurrent chat
requests (one streamed, one bad), stops it with SIGTERM and writes what came back as
JSON: each answer with the replica that served it, and the processes of the server's
session still alive afterwards. Every wait is bounded; the server stops by itself too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from emu_edge.serve.cli import session_processes, wait_until_serving

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small red square"]
REQUESTS = 12


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid} " + f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return f"{pid} (gone)"


def replica_of(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.headers.get("x-emu-edge-replica")
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(args.out + ".log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "emu_edge.cli", "serve", "--ray", "--replicas", "2", "--replica-cpus", "0.5",
         "--bundle", args.bundle, "--port", str(port), "--threads", "1", "--max-body-mb", "1", "--stop-after", "50"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"answers": [], "started_s": None}
    start = time.monotonic()
    try:
        if wait_until_serving(url, server, 45):
            result["started_s"] = round(time.monotonic() - start, 1)
            # Ray's proxy learns of the second replica a moment after the first answers:
            # the burst below is sent once both have answered a health check.
            seen: set = set()
            with ThreadPoolExecutor(4) as pool:
                while len(seen) < 2 and time.monotonic() - start < 60:
                    seen |= set(pool.map(lambda _: replica_of(f"{url}/health"), range(4)))
            result["replicas_healthy_s"] = round(time.monotonic() - start, 1)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)

            def ask(i: int) -> dict:
                prompt = PROMPTS[i % len(PROMPTS)]
                raw = client.chat.completions.with_raw_response.create(
                    model="emu-edge", messages=[{"role": "user", "content": prompt}], max_tokens=8)
                answer = raw.parse()
                return {"prompt": prompt, "text": answer.choices[0].message.content,
                        "replica": raw.headers.get("x-emu-edge-replica")}

            with ThreadPoolExecutor(REQUESTS) as pool:
                result["answers"] = list(pool.map(ask, range(REQUESTS)))
            stream = client.chat.completions.create(model="emu-edge", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                    max_tokens=8, stream=True)
            result["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
            try:
                client.chat.completions.create(model="emu-edge", messages=[], max_tokens=8)
            except openai.APIStatusError as e:
                result["bad_request_status"] = e.status_code
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            result["exit_code"] = None
        time.sleep(1.0)
        result["left"] = [command_line(pid) for pid in session_processes(server.pid)]
        if result["left"]:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
