"""PNG plots of a session's results: the side-by-side comparisons and the cost curves."""

from __future__ import annotations

from pathlib import Path

from .harness import Results


def _unet_by_resolution(results: Results) -> dict[str, dict]:
    """U-Net step time against resolution, from the U-Net comparisons of the presets."""
    series: dict[str, dict] = {}
    for c in results.comparisons.values():
        if "resolution" not in c or "checkpoint" == c.get("model"):
            continue
        for peer, s in c["peers"].items():
            series.setdefault(peer, {})[c["resolution"]] = s["per_unit_ms"]
    return series if any(len(v) > 1 for v in series.values()) else {}


def _grid(plt, n: int, max_cols: int, width: float, height: float):
    cols = min(max_cols, n)
    rows = (n + cols - 1) // cols
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def _save(plt, fig, axes, used: int, path: Path) -> Path:
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: Results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    comparisons = list(results.comparisons.items())
    if comparisons:
        fig, axes = _grid(plt, len(comparisons), 3, 6, 3.2)
        for ax, (name, c) in zip(axes.flat, comparisons):
            peers = list(c["peers"])
            med = [c["peers"][p]["per_unit_ms"] for p in peers]
            lo = [m - c["peers"][p]["min_s"] / c["peers"][p]["work"] * 1e3 for p, m in zip(peers, med)]
            hi = [c["peers"][p]["max_s"] / c["peers"][p]["work"] * 1e3 - m for p, m in zip(peers, med)]
            colors = ["tab:blue" if p.startswith("emu-edge") else "tab:gray" for p in peers]
            ax.barh(peers, med, xerr=[lo, hi], color=colors, capsize=3)
            ax.invert_yaxis()
            ax.set_xlabel(f"ms per {c['unit']} (median; bars: min to max)")
            ax.set_title(name, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="x", alpha=0.3)
        written.append(_save(plt, fig, axes, len(comparisons), out / "side_by_side.png"))

    curves = dict(results.curves)
    unet = _unet_by_resolution(results)
    if unet:
        curves["U-Net step vs resolution (batch 2 with guidance)"] = {"x": "resolution (pixels)",
                                                                      "y": "ms per step", "series": unet}
    if curves:
        fig, axes = _grid(plt, len(curves), 2, 6.5, 4)
        for ax, (name, curve) in zip(axes.flat, curves.items()):
            for label, points in curve["series"].items():
                xs = sorted(points, key=float)
                ax.plot([float(x) for x in xs], [points[x] for x in xs], marker="o", label=label)
            ax.set(xlabel=curve["x"], ylabel=curve["y"])
            ax.set_title(name, fontsize=8)
            ax.set_xscale("log", base=2)
            if "regression" in name:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(plt, fig, axes, len(curves), out / "scaling.png"))
    return written
