"""How decode cost grows: step latency against context length, throughput against batch.

Each point: fill the cache with a prompt of the given length (not timed), then time
`STEPS` greedy decode steps; the peers take turns at every point.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from .harness import interleave

STEPS = 16


def _ours_steps(pipe, ids: np.ndarray, max_length: int):
    """Decode-step seconds of our runtime after a prefill of `ids` [B, L]: the loop's own
    verbs (DecoderSession.prefill and step) on a cache sized for the point."""
    session = pipe.session(ids.shape[0], max_length)

    def run() -> float:
        out = session.prefill(ids.tolist())
        tokens = np.argmax(out.logits, axis=-1)
        start = time.perf_counter()
        for _ in range(STEPS):
            out = session.step(tokens)
            tokens = np.argmax(out.logits, axis=-1)
        return (time.perf_counter() - start) / STEPS

    return run


def _genai_steps(model_dir, prompt: list[int]):
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokens = np.asarray(prompt, dtype=np.int32)

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + STEPS + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokens)
        generator.generate_next_token()  # the first token comes from the prefill's logits
        start = time.perf_counter()
        for _ in range(STEPS):
            generator.generate_next_token()
        return (time.perf_counter() - start) / STEPS

    return run


def _sweep(points, rounds: int, peers_at, value) -> dict[str, dict]:
    """One curve per peer: at each point the peers `peers_at(point)` take turns for `rounds`
    rounds, and `value(point, timing)` is what the curve records there."""
    series: dict[str, dict] = {}
    for point in points:
        for peer, t in interleave(None, peers_at(point), rounds, self_timed=True).items():
            series.setdefault(peer, {})[point] = value(point, t)
    return series


def _ours(workspace, name: str, ids: np.ndarray, max_length: int) -> dict:
    return {f"emu-edge {p}": _ours_steps(workspace.pipeline(name, p), ids, max_length) for p in ("fp32", "int4")}


@pytest.mark.smoke
def test_decode_vs_context(benchmark, workspace, settings, results):
    name = settings.decoder
    vocab = workspace.torch_model(name).cfg.vocab_size
    rng = np.random.default_rng(0)
    rounds = max(2, settings.rounds // 2)
    series: dict[str, dict] = {}

    def peers_at(length: int) -> dict:
        ids = rng.integers(8, vocab, (1, length))
        found = _ours(workspace, name, ids, length + STEPS + 1)
        for precision in ("fp32", "int4"):
            try:
                genai = workspace.genai(name, precision)
                found[f"onnxruntime-genai {precision}"] = _genai_steps(genai, ids[0].tolist())
            except pytest.skip.Exception:
                pass
        return found

    def one_pass():
        series.update(_sweep(settings.contexts, rounds, peers_at, lambda length, t: t.median * 1e3))

    benchmark.group = f"decode vs context {name}"
    benchmark.pedantic(one_pass, rounds=1, iterations=1)
    results.curve(f"decode step vs context length ({name}, batch 1, {rounds} rounds per point)", "context (tokens)",
                  "ms per step", series, benchmark=benchmark)


@pytest.mark.smoke
def test_decode_vs_batch(benchmark, workspace, settings, results):
    name = settings.decoder
    vocab = workspace.torch_model(name).cfg.vocab_size
    rng = np.random.default_rng(0)
    rounds = max(2, settings.rounds // 2)
    series: dict[str, dict] = {}

    def peers_at(batch: int) -> dict:
        ids = rng.integers(8, vocab, (batch, settings.prompt_tokens))
        return _ours(workspace, name, ids, settings.prompt_tokens + STEPS + 1)

    def one_pass():
        series.update(_sweep(settings.batches, rounds, peers_at, lambda batch, t: batch / t.median))

    benchmark.group = f"decode vs batch {name}"
    benchmark.pedantic(one_pass, rounds=1, iterations=1)
    results.curve(f"decode throughput vs batch size ({name}, {settings.prompt_tokens}-token prompts)", "batch",
                  "tokens/s (all rows)", series, benchmark=benchmark)
