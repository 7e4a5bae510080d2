"""Interleaved timing and the session's record of results.

Peers are timed in rounds, A B C A B C ..., never all of A then all of B: a machine that
drifts (thermal, another process, the page cache) then shifts every peer alike instead of
favouring whichever ran in the quiet minute. pytest-benchmark drives the rounds (pedantic
mode, one round per call) and stores the per-peer figures in `extra_info`; this module
keeps the per-peer times, their spread, and the ratios between peers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


# Per-peer figures a comparison may carry beside its timings: key -> what they are.
FIGURES = {"tokens_per_s": "tokens/s", "vq_decode_share": "VQ decode's share of the time",
           "cfg_cost": "time with guidance / without", "peak_rss_mb": "peak RSS (MB)"}


def figure_text(c: dict, key: str) -> str:
    """One line of a comparison's per-peer figures: "what: peer value; peer value"."""
    def value(v) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)

    return f"{FIGURES[key]}: " + "; ".join(f"{peer} {value(v)}" for peer, v in c[key].items())


@dataclass
class Timing:
    """The seconds of every round of one peer; `work` units per call (tokens, steps...)."""

    peer: str
    seconds: list[float] = field(default_factory=list)
    work: float = 1.0

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def rate(self) -> float:
        """Work units per second at the median time (tokens/s for decode)."""
        return self.work / self.median

    def spread(self) -> tuple[float, float]:
        """(min, max) of the per-call time: a rerun's median should land inside it."""
        return float(min(self.seconds)), float(max(self.seconds))

    def summary(self, unit: str) -> dict:
        lo, hi = self.spread()
        out = {"median_s": self.median, "min_s": lo, "max_s": hi, "rounds": len(self.seconds),
               "work": self.work, "per_unit_ms": self.median / self.work * 1e3}
        if unit:
            out[f"{unit}_per_s"] = self.rate
        return out


def interleave(benchmark, peers: dict[str, Callable[[], object]], rounds: int, work: dict[str, float] | float = 1.0,
               warmup: int = 1, self_timed: bool = False, pause: float = 0.05) -> dict[str, Timing]:
    """Time each peer once per round, in a fixed order, for `rounds` rounds (after `warmup`
    untimed rounds). `benchmark` is pytest-benchmark's fixture; None runs without it.
    self_timed: each call returns the seconds of the part that counts (e.g. decode steps
    after an untimed prefill). `pause` seconds between calls let the previous peer's
    spinning worker threads (OpenMP, onnxruntime) go idle before the next one starts."""
    work_of = work if isinstance(work, dict) else {name: work for name in peers}
    timings = {name: Timing(name, work=float(work_of[name])) for name in peers}
    for _ in range(warmup):
        for fn in peers.values():
            fn()

    def one_round():
        for name, fn in peers.items():
            time.sleep(pause)
            start = time.perf_counter()
            measured = fn()
            elapsed = time.perf_counter() - start
            timings[name].seconds.append(float(measured) if self_timed else elapsed)

    if benchmark is None:
        for _ in range(rounds):
            one_round()
    else:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return timings


def ratios(timings: dict[str, Timing], subject: str) -> dict[str, float]:
    """How many times faster `subject` is than each other peer (per unit of work)."""
    mine = timings[subject].median / timings[subject].work
    return {name: (t.median / t.work) / mine for name, t in timings.items() if name != subject}


@dataclass
class Target:
    name: str
    measured: float
    required: float
    unit: str
    note: str = ""
    at_most: bool = False       # a cost to stay under (a ratio of times), not a speed-up to reach

    @property
    def met(self) -> bool:
        return self.measured <= self.required if self.at_most else self.measured >= self.required

    def as_dict(self) -> dict:
        return {"name": self.name, "measured": self.measured, "required": self.required, "unit": self.unit,
                "met": self.met, "note": self.note, "at_most": self.at_most}


class Results:
    """Everything one session measured, for the summary, the JSON file and the plots."""

    def __init__(self):
        self.comparisons: dict[str, dict] = {}
        self.curves: dict[str, dict] = {}
        self.targets: list[Target] = []
        self.facts: dict[str, object] = {}

    def compare(self, name: str, timings: dict[str, Timing], unit: str, subject: str | None = None,
                extra: dict | None = None, benchmark=None) -> dict:
        entry = {"unit": unit, "peers": {p: t.summary(unit) for p, t in timings.items()}, **(extra or {})}
        if subject is not None:
            entry["subject"] = subject
            entry["ratios"] = ratios(timings, subject)
        self.comparisons[name] = entry
        if benchmark is not None:
            benchmark.extra_info.update(entry)
        return entry

    def curve(self, name: str, x_label: str, y_label: str, series: dict[str, dict], benchmark=None) -> None:
        """series: label -> {x: y}."""
        self.curves[name] = {"x": x_label, "y": y_label, "series": series}
        if benchmark is not None:
            benchmark.extra_info.update({"curve": name, "series": series})

    def target(self, name: str, measured: float, required: float, unit: str = "x", note: str = "",
               at_most: bool = False) -> Target:
        t = Target(name, float(measured), float(required), unit, note, at_most)
        self.targets.append(t)
        return t

    def as_dict(self) -> dict:
        return {"facts": self.facts, "comparisons": self.comparisons, "curves": self.curves,
                "targets": [t.as_dict() for t in self.targets]}

    # -- text -------------------------------------------------------------------------------

    def format(self) -> str:
        lines = []
        for name, c in self.comparisons.items():
            unit = c["unit"]
            lines.append(f"{name}")
            subject = c.get("subject")
            for peer, s in c["peers"].items():
                rate = f"{s[f'{unit}_per_s']:9.1f} {unit}/s" if unit else ""
                ratio = ""
                if subject is not None and peer != subject:
                    ratio = f"  {subject} is {c['ratios'][peer]:.2f}x"
                lines.append(f"  {peer:<34} median {s['median_s'] * 1e3:9.2f} ms  (min {s['min_s'] * 1e3:.2f}, max "
                             f"{s['max_s'] * 1e3:.2f}, {s['rounds']} rounds)  {rate}{ratio}")
            if "agreement" in c:
                lines.append(f"  agreement: {c['agreement']}")
            lines += [f"  {figure_text(c, key)}" for key in FIGURES if key in c]
            if "note" in c:
                lines.append(f"  note: {c['note']}")
        for name, curve in self.curves.items():
            lines.append(f"{name} ({curve['y']} by {curve['x']})")
            for label, points in curve["series"].items():
                pts = ", ".join(f"{x}: {y:.2f}" for x, y in points.items())
                lines.append(f"  {label:<34} {pts}")
        if self.targets:
            lines.append("targets")
            for t in self.targets:
                mark = "met " if t.met else "MISS"
                bound = "<=" if t.at_most else ">="
                lines.append(f"  [{mark}] {t.name}: {t.measured:.2f}{t.unit} (needs {bound} {t.required:.2f}{t.unit})"
                             + (f"  {t.note}" if t.note else ""))
        return "\n".join(lines)
