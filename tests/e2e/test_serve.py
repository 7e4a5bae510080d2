"""`emu-edge serve` through the official openai client, on 127.0.0.1 only: the shipped
model and a tiny Emu3 folder behind the same routes, answers equal to the Python API's,
batching that changes no tokens, and a 4xx (never a 500 or a dead worker) for each kind
of bad request. Each server is a subprocess that stops by itself (--stop-after) if the
test does not stop it first (SIGTERM, checked to leave no process behind)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from tiny_models import make_emu3_bundle  # noqa: E402
from emu_edge.runtime.pipeline import Pipeline  # noqa: E402
from emu_edge.runtime.sampling import Sampler  # noqa: E402
from emu_edge.serve.cli import session_processes, wait_until_serving  # noqa: E402

KEY = "test-key-123"


class Server:
    def __init__(self, bundle, *options: str, ignore_sigint: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # its own session: the server, its HTTP process and its worker share one group
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emu_edge.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
             "--threads", "1", "--stop-after", "400", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
            # as a shell starts a background job (`emu-edge serve &`): SIGINT ignored
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
        if not wait_until_serving(self.url, self.process, 90):
            self.process.kill()
            raise RuntimeError(f"the server did not start: {self.process.stdout.read()}")

    def client(self, api_key: str = "none", **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def post(self, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    def stop(self) -> None:
        """SIGTERM: the server stops its HTTP process and worker and exits."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            time.sleep(1.0)
            left = session_processes(self.process.pid)
            if left:
                os.killpg(self.process.pid, signal.SIGKILL)
        assert not left, f"processes left after SIGTERM: {left}"


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(image, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def shapes(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def emu2(shipped_bundle):
    server = Server(shipped_bundle, "--max-batch", "4", "--batch-timeout", "0.3", "--max-images", "2",
                    "--max-image-pixels", str(100 * 100), "--max-body-mb", "1")
    yield server, Pipeline.load(shipped_bundle, threads=1)
    server.stop()


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    bundle = make_emu3_bundle(tmp_path_factory.mktemp("serve_emu3"), "f2", image_area=64)
    server = Server(bundle, "--api-key", KEY)
    yield server, Pipeline.load(bundle, threads=1)
    server.stop()


# -- the routes ----------------------------------------------------------------------------


def test_models_lists_the_bundle_by_both_names(emu2):
    server, _ = emu2
    client = server.client()
    assert [m.id for m in client.models.list()] == ["emu-edge", "emu-edge-small"]
    assert client.models.retrieve("emu-edge-small").id == "emu-edge-small"
    with pytest.raises(openai.NotFoundError, match="'emu-edge', 'emu-edge-small'"):
        client.models.retrieve("gpt-4")


def test_chat_equals_the_python_api_alone_batched_and_streamed(emu2):
    """Four concurrent requests (batched: the server saw batches of more than one) give
    what each gets alone from the Pipeline; a stream's pieces join into the same text."""
    server, pipe = emu2
    client = server.client()
    images = shapes(4)
    prompts = [([images[0]], None), ([images[1]], "what colour is the shape?"), ([images[2]], "what shape is it?"),
               ([images[3]], "is it large or small?")]
    want = [pipe.generate_text(items + ([text] if text else [])) for items, text in prompts]
    batches_before = server.metric("emu_edge_batch_size_count")
    rows_before = server.metric("emu_edge_batch_size_sum")

    def ask(i):
        items, text = prompts[i]
        return client.chat.completions.create(model="emu-edge", messages=image_message(items[0], text))

    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].message.content for r in results] == want
    for r, (items, text) in zip(results, prompts):
        rows, _ = pipe.family.text_prompts([items + ([text] if text else [])], "auto", False, 64, None)
        assert r.usage.prompt_tokens == len(rows[0]) and r.usage.completion_tokens >= 1
        assert r.choices[0].finish_reason == "stop"
    # at least one batch held more than one request
    assert server.metric("emu_edge_batch_size_sum") - rows_before > server.metric("emu_edge_batch_size_count") \
        - batches_before

    stream = client.chat.completions.create(model="emu-edge-small", messages=image_message(images[1], prompts[1][1]),
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == want[1]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens >= 1


def test_requests_sent_while_a_long_answer_streams_join_it(emu2):
    """A caption and a sampled VQA sent while a 400-token answer streams join its decode
    (the batch-size metric counts rows that shared steps) and finish while it goes on;
    all three are what each gets alone."""
    server, pipe = emu2
    client = server.client()
    image = shapes(2)[1]
    long_want = pipe.generate_text("a red circle", max_new_tokens=400)
    caption_want = pipe.generate_text([image])
    vqa_want = pipe.generate_text([image, "what colour is it?"], temperature=0.8, seed=5, do_sample=True)
    count, rows = server.metric("emu_edge_batch_size_count"), server.metric("emu_edge_batch_size_sum")
    stream = client.chat.completions.create(model="emu-edge", messages=[{"role": "user", "content": "a red circle"}],
                                            max_tokens=400, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        if "".join(pieces).strip():
            break   # the long answer has started
    results = {}
    asks = {"caption": dict(messages=image_message(image)),
            "vqa": dict(messages=image_message(image, "what colour is it?"), temperature=0.8, seed=5)}
    threads = [threading.Thread(target=lambda name=name, kw=kw: results.__setitem__(
        name, client.chat.completions.create(model="emu-edge", **kw))) for name, kw in asks.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pieces += [chunk.choices[0].delta.content or "" for chunk in stream]
    assert results["caption"].choices[0].message.content == caption_want
    assert results["vqa"].choices[0].message.content == vqa_want
    assert "".join(pieces).strip() == long_want
    assert server.metric("emu_edge_batch_size_count") - count == 3
    # each of the three shared decode steps with another: more rows than requests
    assert server.metric("emu_edge_batch_size_sum") - rows >= 6


def test_max_tokens_ends_with_length_and_multi_turn_is_one_prompt(emu2):
    server, pipe = emu2
    client = server.client()
    image = shapes(1)[0]
    r = client.chat.completions.create(model="emu-edge", messages=image_message(image), max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert r.choices[0].message.content == pipe.generate_text([image], max_new_tokens=2)

    turns = [([image, "what shape is it?"], "a circle"), (["what colour is it?"], None)]
    messages = image_message(image, "what shape is it?") + [
        {"role": "assistant", "content": "a circle"}, {"role": "user", "content": "what colour is it?"}]
    r = client.chat.completions.create(model="emu-edge", messages=messages, max_tokens=8)
    ids, visual = pipe.family.chat_prompt(turns)
    want = pipe._decode(pipe.generate([ids], 8, Sampler(), pipe.manifest.model.eos_ids(), visual)[0]).strip()
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)


def test_images_generate_and_edit_on_emu2(emu2):
    server, pipe = emu2
    client = server.client()
    out = client.images.generate(model="emu-edge", prompt="a red circle", n=2, size="32x32",
                                 response_format="b64_json", extra_body={"seed": 3, "steps": 4, "guidance": 2.0})
    got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in out.data]
    want = pipe.image_request("a red circle", n=2, guidance=2.0, steps=4, seed=3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))
    buffer = io.BytesIO()
    shapes(1)[0].save(buffer, format="PNG")
    edit = client.images.edit(model="emu-edge", image=("in.png", buffer.getvalue(), "image/png"),
                              prompt="make it blue", extra_body={"steps": 3, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (32, 32)
    with pytest.raises(openai.BadRequestError, match="32x32 images only"):
        client.images.generate(model="emu-edge", prompt="a red circle", size="1024x1024")


# -- bad requests: a 4xx with a message, and the server goes on --------------------------


@pytest.mark.parametrize("case", [
    "malformed_json", "not_an_object", "bad_base64", "not_an_image", "too_many_pixels", "too_many_images",
    "remote_url", "prompt_too_long", "max_tokens_too_large", "negative_temperature", "nan_top_p", "empty_messages",
    "last_message_assistant", "unknown_size", "url_format", "body_too_large"])
def test_bad_requests_get_a_4xx_with_a_message(emu2, case):
    server, _ = emu2
    image = shapes(1)[0]
    ok_messages = image_message(image)

    def chat(**fields):
        return server.post("/v1/chat/completions", json.dumps({"model": "emu-edge", **fields}).encode())

    if case == "malformed_json":
        status, body = server.post("/v1/chat/completions", b'{"model": "emu-edge", "messages": [')
    elif case == "not_an_object":
        status, body = server.post("/v1/chat/completions", b"[1, 2]")
    elif case == "bad_base64":
        status, body = chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}]}])
    elif case == "not_an_image":
        url = "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()
        status, body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    elif case == "too_many_pixels":
        status, body = chat(messages=image_message(Image.new("RGB", (101, 100))))
    elif case == "too_many_images":
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}}] * 3
        status, body = chat(messages=[{"role": "user", "content": content}])
    elif case == "remote_url":
        status, body = chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}])
    elif case == "prompt_too_long":
        status, body = chat(messages=[{"role": "user", "content": "red " * 2000}])
    elif case == "max_tokens_too_large":
        status, body = chat(messages=ok_messages, max_tokens=10**6)
    elif case == "negative_temperature":
        status, body = chat(messages=ok_messages, temperature=-1)
    elif case == "nan_top_p":
        status, body = server.post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                           b'"top_p": NaN}')
    elif case == "empty_messages":
        status, body = chat(messages=[])
    elif case == "last_message_assistant":
        status, body = chat(messages=ok_messages + [{"role": "assistant", "content": "a circle"}])
    elif case == "unknown_size":
        status, body = server.post("/v1/images/generations", json.dumps({"prompt": "a red circle",
                                                                         "size": "big"}).encode())
    elif case == "url_format":
        status, body = server.post("/v1/images/generations", json.dumps({"prompt": "a red circle",
                                                                         "response_format": "url"}).encode())
    elif case == "body_too_large":
        status, body = chat(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    expected = 413 if case == "body_too_large" else 400
    assert status == expected, body
    if case != "body_too_large":
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    # the worker is alive and answers the next request
    assert server.client().chat.completions.create(model="emu-edge", messages=ok_messages, max_tokens=2).choices


def test_a_client_gone_mid_stream_leaks_nothing(emu2):
    server, _ = emu2
    image = shapes(1)[0]
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"messages": image_message(image), "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.readline().startswith(b"data: ")   # the first chunk, then hang up
    deadline = time.monotonic() + 20
    while server.metric("emu_edge_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("emu_edge_queue_depth") == 0
    assert server.client().chat.completions.create(model="emu-edge", messages=image_message(image),
                                                   max_tokens=2).choices


# -- the Emu3 bundle behind the same routes, with an API key ------------------------------


def test_emu3_chat_and_images_with_an_api_key(emu3):
    server, pipe = emu3
    with pytest.raises(openai.AuthenticationError):
        server.client().models.list()
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="emu-edge", messages=[
            {"role": "user", "content": "w5"}])
    client = server.client(api_key=KEY)
    image = shapes(1)[0].resize((12, 10))
    r = client.chat.completions.create(model="emu-edge", messages=image_message(image, "w5 w6"), max_tokens=4)
    assert r.choices[0].message.content == pipe.generate_text([image, "w5 w6"], max_new_tokens=4)

    out = client.images.generate(model="emu-edge", prompt="w5 w6", size="16x8", response_format="b64_json",
                                 extra_body={"seed": 2, "guidance": 2.5})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))))
    want = pipe.generate_image("w5 w6", width=16, height=8, guidance=2.5, seed=2)
    np.testing.assert_array_equal(got, np.asarray(want))
    with pytest.raises(openai.BadRequestError, match="multiple of"):
        client.images.generate(model="emu-edge", prompt="w5", size="13x12")
    with pytest.raises(openai.BadRequestError, match="do not edit"):
        client.images.edit(model="emu-edge", image=("in.png", base64.b64decode(data_url(image).split(",")[1]),
                                                    "image/png"), prompt="w5")


# -- a full queue and a timeout ----------------------------------------------------------


def test_a_server_started_in_the_background_stops_on_sigterm(tiny_bundle):
    server = Server(tiny_bundle, ignore_sigint=True)
    assert server.client().models.list().data
    server.stop()   # within 30 s, leaving no process


def test_a_full_queue_answers_429_and_a_late_request_504(tiny_bundle):
    server = Server(tiny_bundle, "--max-queue", "1", "--timeout", "3", "--batch-timeout", "0")
    try:
        client = server.client()
        results = {}

        def slow():
            try:
                # about 7 s of denoising here: past the 3 s timeout
                client.images.generate(model="emu-edge", prompt="a red circle", n=4, extra_body={"steps": 1000})
            except openai.APIStatusError as e:
                results["slow"] = e.status_code

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(1.0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="emu-edge", messages=[{"role": "user", "content": "a red circle"}])
        thread.join(timeout=60)
        assert results["slow"] == 504
        r = client.chat.completions.create(model="emu-edge", messages=[{"role": "user", "content": "a"}],
                                           max_tokens=2)
        assert r.choices and math.isfinite(r.usage.total_tokens)
    finally:
        server.stop()


# -- the engine alone ----------------------------------------------------------------------


def test_a_bad_job_in_a_batch_leaves_its_neighbours_alone(tiny_bundle):
    """One batch: a prompt beyond the context answers 400 at once; the others run as one
    decode and get what generate_text gives each alone (one with its own max_tokens)."""
    from emu_edge.serve.engine import Engine
    from emu_edge.serve.requests import TextJob

    pipe = Pipeline.load(tiny_bundle, threads=1)
    jobs = [TextJob(turns=[(["a red circle"], None)]), TextJob(turns=[(["red " * 2000], None)]),
            TextJob(turns=[(["a blue square"], None)], max_tokens=3)]
    texts, done, errors = ["", "", ""], [None] * 3, [None] * 3
    for events in Engine(pipe).run(jobs):
        for i, event in enumerate(events):
            if event is None:
                continue
            texts[i] += event.get("text", "")
            done[i] = event.get("done", done[i])
            errors[i] = event.get("error", errors[i])
    assert errors[1]["status"] == 400 and "max_length" in errors[1]["message"] and done[1] is None
    assert texts[0].strip() == pipe.generate_text("a red circle") and errors[0] is None
    assert texts[2].strip() == pipe.generate_text("a blue square", max_new_tokens=3)
    assert done[0]["batch"] == done[2]["batch"] == 2 and done[2]["completion_tokens"] <= 3


def test_sampled_and_image_jobs_batched_get_what_each_gets_alone(tiny_bundle):
    """Sampled answers with their own seeds share decode steps, and image requests of the
    same settings one call (on the image thread, while the text rows step): each gets
    what the Python API gives it alone."""
    from emu_edge.serve.engine import Engine
    from emu_edge.serve.requests import ImageJob, TextJob

    pipe = Pipeline.load(tiny_bundle, threads=1)
    sampling = {"do_sample": True, "temperature": 0.9, "top_p": 0.95}
    jobs = [TextJob(turns=[(["a red circle"], None)], sampling={**sampling, "seed": 1}, max_tokens=6),
            ImageJob(prompt="a red circle", n=2, steps=3, seed=3),
            TextJob(turns=[(["a blue square"], None)], sampling={**sampling, "seed": 2}, max_tokens=6),
            ImageJob(prompt="a blue square", n=1, steps=3, seed=4)]
    got = [dict(text="") for _ in jobs]
    for events in Engine(pipe, max_rows=4).run(jobs):
        for i, event in enumerate(events):
            if event is not None:
                got[i]["text"] += event.get("text", "")
                got[i].update({k: v for k, v in event.items() if k != "text"})
    for i, prompt, seed in ((0, "a red circle", 1), (2, "a blue square", 2)):
        assert got[i]["text"].strip() == pipe.generate_text(prompt, max_new_tokens=6, seed=seed, **sampling)
        assert got[i]["done"]["batch"] == 2
    for i, prompt, n, seed in ((1, "a red circle", 2, 3), (3, "a blue square", 1, 4)):
        want = pipe.image_request(prompt, n=n, steps=3, seed=seed)
        assert len(got[i]["images"]) == n and got[i]["done"]["batch"] == 3
        for b64, image in zip(got[i]["images"], want):
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))), np.asarray(image))


def test_requests_joining_a_running_batch_get_what_each_gets_alone(shipped_bundle):
    """Continuous batching: requests submitted at staggered steps join the running decode
    (3 rows: the fourth and later wait for a free row), leave when done, and each streams
    exactly what generate_text gives it alone: captions, VQA, a text prompt, sampled ones
    with their seeds, a stop string, max_tokens. A cancelled request frees its row."""
    from emu_edge.serve.engine import Engine, is_last
    from emu_edge.serve.requests import TextJob

    pipe = Pipeline.load(shipped_bundle, threads=1)
    images = shapes(5)
    sampled = {"do_sample": True, "temperature": 1.0, "top_p": 0.9}
    # (submitted at step, items, sampling, max_tokens, stop)
    plan = [(0, ["a red circle"], {}, 40, None), (0, [images[0]], {}, None, None),
            (2, [images[1], "what colour is the shape?"], {}, None, None),
            (3, ["a blue square"], {**sampled, "seed": 4}, 24, None), (5, [images[2]], {**sampled, "seed": 9}, None,
                                                                       None),
            (5, [images[3], "what shape is it?"], {}, None, None), (11, ["a green circle"], {}, 30, ["large"]),
            (12, [images[4]], {}, 3, None)]
    want = [pipe.generate_text(items, max_new_tokens=limit, stop=stop, **sampling)
            for _, items, sampling, limit, stop in plan]
    engine = Engine(pipe, max_rows=3)
    texts, done, joined_busy = [""] * len(plan), {}, set()
    engine.submit("cancelled", TextJob(turns=[(["a red square"], None)], max_tokens=200))
    for step in range(400):
        for i, (at, items, sampling, limit, stop) in enumerate(plan):
            if at == step:
                engine.submit(i, TextJob(turns=[(items, None)], sampling=sampling, max_tokens=limit, stop=stop))
        if step == 4:
            engine.cancel("cancelled")
        before = {row.key: row.count for row in engine.rows if row is not None}
        for key, event in engine.step():
            if key == "cancelled":
                assert step < 4 and not is_last(event)
                continue
            texts[key] += event.get("text", "")
            if is_last(event):
                done[key] = event
        # a request that took a row while another was mid-answer
        joined_busy |= {row.key for row in engine.rows if row is not None and row.key not in before
                        and any(count > 0 for count in before.values())}
        if len(done) == len(plan) and not engine.busy:
            break
    assert [t.strip() for t in texts] == want
    assert all("error" not in event for event in done.values())
    assert done[6]["done"]["finish_reason"] == "stop" and done[7]["done"]["completion_tokens"] == 3
    assert len(joined_busy) >= 4 and "cancelled" not in done
    assert all(row is None for row in engine.rows) and engine.session.lengths.max() == 0


def test_a_row_that_fails_to_sample_ends_alone(tiny_bundle):
    """A decode step whose logits turn NaN for one request's row: that request answers
    500 and its row is freed; the other, of other settings, goes on to its solo answer."""
    from emu_edge.serve.engine import Engine, is_last
    from emu_edge.serve.requests import TextJob

    pipe = Pipeline.load(tiny_bundle, threads=1)
    engine = Engine(pipe, max_rows=2)
    step = engine.session.step

    def poisoned(tokens, check=True, rows=None):
        out = step(tokens, check, rows)
        out.logits[0] = np.nan
        return out

    engine.session.step = poisoned
    sampling = {"do_sample": True, "temperature": 0.9, "seed": 3}
    jobs = [TextJob(turns=[(["a red circle"], None)], max_tokens=8),
            TextJob(turns=[(["a blue square"], None)], sampling=sampling, max_tokens=8)]
    last, text = {}, ""
    for events in engine.run(jobs):
        for i, event in enumerate(events):
            if event is not None:
                text += event.get("text", "") if i == 1 else ""
                if is_last(event):
                    last[i] = event
    assert last[0]["error"]["status"] == 500 and "NaN" in last[0]["error"]["message"]
    assert text.strip() == pipe.generate_text("a blue square", max_new_tokens=8, **sampling)
    assert last[1]["done"]["completion_tokens"] <= 8 and all(row is None for row in engine.rows)
