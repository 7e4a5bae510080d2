"""Markdown tables from a results.json, for the README (so the table is the run's own output).

    python -m benchmarks.report benchmarks/results/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import FIGURES, figure_text


def _rate(peer: dict, unit: str) -> str:
    rate = peer.get(f"{unit}_per_s")
    return f"{rate:,.1f} {unit}/s" if rate is not None else ""


def markdown(results: dict) -> str:
    facts = results.get("facts", {})
    s = facts.get("settings", {})
    machine = facts.get("machine", {})
    lines = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} cores; {s.get('threads')} threads for "
             f"every peer, {s.get('rounds')} interleaved rounds; medians, with the min and max over the rounds.", ""]
    versions = facts.get("versions", {})
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    for name, c in results.get("comparisons", {}).items():
        unit, subject = c["unit"], c.get("subject")
        lines += [f"**{name}**", "", f"| peer | median per {unit} | min to max | rate | {subject} is |",
                  "|---|---:|---:|---:|---:|"]
        for peer, p in c["peers"].items():
            per = p["per_unit_ms"]
            lo, hi = p["min_s"] / p["work"] * 1e3, p["max_s"] / p["work"] * 1e3
            ratio = "" if peer == subject else f"{c['ratios'][peer]:.2f}x"
            lines.append(f"| {peer} | {per:.3f} ms | {lo:.3f} to {hi:.3f} | {_rate(p, unit)} | {ratio} |")
        if "agreement" in c:
            lines += ["", f"Accuracy: {_agreement(c['agreement'])}"]
        for key in FIGURES:
            if key in c:
                lines += ["", figure_text(c, key)]
        if "note" in c:
            lines += ["", f"Note: {c['note']}"]
        lines.append("")
    targets = results.get("targets", [])
    if targets:
        lines += ["| target | measured | required | |", "|---|---:|---:|---|"]
        for t in targets:
            mark = "met" if t["met"] else "**missed**"
            note = f" ({t['note']})" if t.get("note") else ""
            bound = "<=" if t.get("at_most") else ">="
            lines.append(f"| {t['name']}{note} | {t['measured']:.2f}{t['unit']} | {bound} {t['required']:.2f}"
                         f"{t['unit']} | {mark} |")
        lines.append("")
    return "\n".join(lines)


def _agreement(a) -> str:
    if isinstance(a, str):
        return a
    parts = []
    for peer, values in a.items():
        parts.append(f"{peer}: " + ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in values.items()))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else Path(__file__).parent / "results" / "results.json"
    print(markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
