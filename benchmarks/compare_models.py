"""The two shipped models side by side: the Emu2-style `emu-edge-small` (continuous
embeddings, a U-Net draws them) and the Emu3-style `emu3-edge-small` (discrete VQ tokens).

    python -m benchmarks.compare_models [--rounds 11] [--threads 2] [--work DIR] [--json F]

Every eval metric comes from each folder's committed eval.json (`emu-edge eval` on the same
test split reproduces it). Timed here, interleaved in rounds in one process after a warm-up
round: a caption of a test image and one generated image at each model's own size and
generation defaults, with the bundle at fp32 and with its decoder at int4 (`emu-edge
quantize --graph decoder=int4`: weight-only, no calibration). Sizes are the bundles' files
on disk. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from emu_edge import data
from emu_edge.runtime.bundle import bundle_size
from emu_edge.runtime.demo import image_size
from emu_edge.runtime.shipped import SHIPPED, shipped_checkpoint

from .harness import interleave
from .peers import export_bundle, export_hf_bundle, load_pipeline, quantized_bundle

FAMILIES = ("emu2", "emu3")
PROMPT = "a red circle"


def bundles(family: str, work: Path, threads: int) -> dict[str, Path]:
    folder = shipped_checkpoint(family)
    export = export_bundle if family == "emu2" else export_hf_bundle
    fp32 = export(folder, work / family)
    return {"fp32": fp32, "int4": quantized_bundle(fp32, "int4", work / family, threads)[0]}


def peers(pipe, family: str) -> dict:
    """(caption one test image, draw one image) for a pipeline, at the model's own size."""
    image = Image.fromarray(data.captioning("test", 1, size=image_size(pipe, family))[0].segments[0].value)
    request = [PROMPT] if family == "emu2" else PROMPT   # emu2 reads interleaved items
    return {"caption": lambda: pipe.generate_text([image]),
            "image": lambda: pipe.generate_image(request, seed=0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_models", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)

    made = {family: bundles(family, args.work, args.threads) for family in FAMILIES}
    calls = {}
    for family in FAMILIES:
        for precision, bundle in made[family].items():
            pipe = load_pipeline(bundle, args.threads)
            for task, fn in peers(pipe, family).items():
                calls[f"{family} {precision} {task}"] = fn
    timings = interleave(None, calls, rounds=args.rounds)

    evals = {f: json.loads((shipped_checkpoint(f) / "eval.json").read_text()) for f in FAMILIES}
    keys = [k for k in dict.fromkeys([*evals["emu2"], *evals["emu3"]])
            if any(isinstance(evals[f].get(k), float) for f in FAMILIES)]
    names = [SHIPPED[f][0] for f in FAMILIES]
    lines = ["| test split | " + " | ".join(names) + " |", "|---|" + "---:|" * len(FAMILIES)]
    for key in keys:
        lines.append(f"| `{key}` | " + " | ".join(
            f"{evals[f][key]:.3f}" if isinstance(evals[f].get(key), float) else "-" for f in FAMILIES) + " |")
    figures = {}
    for precision in ("fp32", "int4"):
        lines.append(f"| bundle size, decoder {precision} | " + " | ".join(
            f"{bundle_size(made[f][precision]) / 1e6:.1f} MB" for f in FAMILIES) + " |")
    for task, what in (("caption", "time to caption"), ("image", "time per generated image")):
        for precision in ("fp32", "int4"):
            cells = []
            for f in FAMILIES:
                t = timings[f"{f} {precision} {task}"]
                figures[f"{f} {precision} {task}"] = {"median_s": t.median, "min_s": min(t.seconds),
                                                      "max_s": max(t.seconds)}
                cells.append(f"{t.median * 1000:.1f} ms [{min(t.seconds) * 1000:.1f}-{max(t.seconds) * 1000:.1f}]")
            lines.append(f"| {what}, {precision} | " + " | ".join(cells) + " |")
    sizes = []
    for f in FAMILIES:
        pipe = load_pipeline(made[f]["fp32"], args.threads)
        size = image_size(pipe, f)
        if f == "emu2":
            sizes.append(f"{size}x{size} px, {pipe.family.image_defaults()['steps']} U-Net steps")
        else:
            rows, cols = pipe.family.image_codes_size(None, None)
            sizes.append(f"{size}x{size} px, {rows * (cols + 1) + 1} image tokens")
    lines.append("| generated image (each model's own size and defaults) | " + " | ".join(sizes) + " |")
    table = "\n".join(lines)
    print(f"{args.rounds} interleaved rounds, {args.threads} threads; median [min-max]\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "threads": args.threads, "timings": figures,
                                         "eval": {f: {k: evals[f].get(k) for k in keys} for f in FAMILIES}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
