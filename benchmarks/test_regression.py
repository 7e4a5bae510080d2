"""Regressing N visual embeddings (the first half of text-to-image), side by side.

Emu2's released code regresses each embedding by running the whole decoder over the whole
sequence so far (no KV cache): O(N^2) positions. PyTorch with a KV cache and our runtime
run one position per embedding. Same prompt ("a red circle", ending in [IMG]) everywhere.
"""

from __future__ import annotations

import pytest

from . import peers
from .harness import interleave

TARGET_VS_EMU2_REFERENCE = 5.0
EMU2 = "Emu2 reference loop (PyTorch, no KV cache)"
TORCH_KV = "PyTorch with KV cache"


def _peers(workspace, name: str, n: int, precisions=("fp32", "int8", "int4")):
    model = workspace.torch_model(name)
    ids = peers.regression_ids(model, workspace.checkpoint(name))
    found = {EMU2: peers.emu2_reference_regress(model, ids, n), TORCH_KV: peers.torch_kv_regress(model, ids, n)}
    for precision in precisions:
        pipe = peers.with_n_query(workspace.pipeline(name, precision), n)
        found[f"emu-edge {precision}"] = peers.ours_regress(pipe)
    return found


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["decoder", "checkpoint"])
def test_regression_side_by_side(benchmark, workspace, settings, results, name):
    name = settings.decoder if name == "decoder" else name
    n = workspace.torch_model(name).cfg.n_query
    found = _peers(workspace, name, n)
    benchmark.group = f"regression {name}"
    timings = interleave(benchmark, found, settings.rounds, work=n)
    entry = results.compare(f"regression: {name}, N = {n} visual embeddings", timings, "emb",
                            subject="emu-edge fp32", extra={"n": n}, benchmark=benchmark)
    if name == settings.decoder:
        results.target(f"regression of {n} embeddings vs the Emu2 reference loop ({name})", entry["ratios"][EMU2],
                       TARGET_VS_EMU2_REFERENCE)


@pytest.mark.smoke
def test_regression_vs_n(benchmark, workspace, settings, results):
    """How regression time grows with N: quadratically without a cache, linearly with one."""
    name = settings.decoder
    rounds = max(2, settings.rounds // 2)
    series: dict[str, dict] = {}

    def one_pass():
        for n in settings.regression_ns:
            found = _peers(workspace, name, n, precisions=("fp32", "int4"))
            timings = interleave(None, found, rounds, work=n)
            for peer, t in timings.items():
                series.setdefault(peer, {})[n] = t.median * 1e3

    benchmark.group = f"regression vs N {name}"
    benchmark.pedantic(one_pass, rounds=1, iterations=1)
    results.curve(f"regression time vs N ({name}, {rounds} interleaved rounds per point)", "N", "ms", series,
                  benchmark=benchmark)
