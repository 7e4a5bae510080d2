"""One Pipeline shared by threads: every call gets the result it would get alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from emu_edge import data
from emu_edge.runtime.pipeline import ConversationBusyError, Pipeline

THREADS = 8


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle, threads=1, max_sessions=3)


def _jobs(size: int) -> list[tuple[str, tuple]]:
    """Mixed work: captions, VQA, streams, sampled text, batches and images."""
    caps = [s.segments[0].value for s in data.captioning("test", 4, size=size)]
    vqa = [(s.segments[0].value, next(g.value for g in s.segments if g.kind == "text"))
           for s in data.vqa("test", 4, size=size)]
    jobs = []
    for i in range(4):
        jobs += [("caption", ([caps[i]],)), ("vqa", ([vqa[i][0], vqa[i][1]],)), ("stream", ([vqa[i][0], vqa[i][1]],)),
                 ("sample", ([caps[i]], i)), ("batch", ([[caps[i]], [vqa[i][0], vqa[i][1]], [caps[(i + 1) % 4]]],)),
                 ("image", (["a red circle"] if i % 2 else [caps[i], "make it blue"], i))]
    return jobs


def _run(pipe, kind, args):
    if kind in ("caption", "vqa"):
        return pipe.generate_text(args[0], max_new_tokens=12, ignore_eos=True)
    if kind == "stream":
        return "".join(pipe.stream_text(args[0], max_new_tokens=12))
    if kind == "sample":
        return pipe.generate_text(args[0], max_new_tokens=12, do_sample=True, temperature=1.5, seed=args[1])
    if kind == "batch":
        return pipe.generate_text_batch(args[0], max_new_tokens=12, ignore_eos=True)
    return np.asarray(pipe.generate_image(args[0], steps=3, seed=args[1]))


def _same(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_shared_pipeline_gives_every_call_its_sequential_result(pipe):
    jobs = _jobs(pipe.manifest.model.emu2.image_size)
    sequential = [_run(pipe, kind, args) for kind, args in jobs]
    # Several rounds in different orders, more threads than pooled sessions (calls wait).
    for round_ in range(2):
        order = np.random.default_rng(round_).permutation(len(jobs))
        with ThreadPoolExecutor(THREADS) as pool:
            futures = {int(i): pool.submit(_run, pipe, *jobs[i]) for i in order}
        wrong = [(jobs[i][0], i) for i, f in futures.items() if not _same(f.result(), sequential[i])]
        assert not wrong, f"round {round_}: {len(wrong)} of {len(jobs)} results differ from sequential: {wrong}"
    assert pipe._sessions._alive <= 3


def test_conversations_run_in_parallel_and_one_is_refused_to_a_second_thread(pipe):
    image = data.captioning("test", 1, size=pipe.manifest.model.emu2.image_size)[0].segments[0].value

    def chat():
        c = pipe.conversation()
        return [c.ask([image, "what colour is it?"], max_new_tokens=8), c.ask(["where is it?"], max_new_tokens=8)]

    alone = chat()
    with ThreadPoolExecutor(4) as pool:
        assert [f.result() for f in [pool.submit(chat) for _ in range(4)]] == [alone] * 4

    shared = pipe.conversation()
    stream = shared.stream([image, "what colour is it?"], max_new_tokens=8)
    next(stream)  # a turn is running
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ConversationBusyError, shared.ask, ["hi"])))
    t.start()
    t.join()
    assert errors and "one thread at a time" in str(errors[0].value)
    stream.close()
    # Once the turn is over the conversation goes on, with the cut-off answer closed.
    assert isinstance(shared.ask(["where is it?"], max_new_tokens=4), str)
