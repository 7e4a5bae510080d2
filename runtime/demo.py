"""`emu-edge demo`: the shipped models, end to end, on images of the held-out test split.

Both shipped models by default, on the same inputs: the Emu2-style `emu-edge-small`
(continuous embeddings, a U-Net draws them) and the Emu3-style `emu3-edge-small` (discrete
VQ tokens in the decoder's vocabulary). Each captions the same test images, answers the
same questions, draws the same prompts and autoencodes an image (emu2: vision encoder and
U-Net; emu3: the VQ-VAE's round trip); emu2 also edits images from image plus text. Writes
each model's PNGs under --out/emu2 and --out/emu3, and one contact sheet (a block per
model), one latency table (a column per model) and demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from emu_edge import data
from emu_edge.cli import thread_count
from emu_edge.runtime.cli import load_pipeline
from emu_edge.runtime.shipped import SHIPPED, cached_bundle_path, default_bundle

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow diamond", "a purple circle",
           "a small orange square", "a red circle left of a blue square")
EDITS = ("make it blue", "as a triangle", "make it small")
CELL = 128
COLUMNS = 8
TITLES = {"emu2": "Emu2-style: continuous embeddings, a U-Net draws them",
          "emu3": "Emu3-style: discrete VQ tokens, next-token prediction"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the PNGs and tables")
    parser.add_argument("--model", choices=("both", "emu2", "emu3"),
                        help="which shipped model: emu2 (emu-edge-small), emu3 (emu3-edge-small) or both "
                             "(the default), on the same inputs")
    parser.add_argument("--bundle", type=Path, help="one bundle folder instead of the shipped models")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    parser.add_argument("--threads", type=thread_count, help="CPU threads per graph (capped at the CPU count)")
    parser.add_argument("--seed", type=int, default=0)


class Timer:
    def __init__(self):
        self.rows: dict[str, list[float]] = {}

    def __call__(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.rows.setdefault(name, []).append(time.perf_counter() - t0)
        return result


def latency_table(timers: dict[str, Timer]) -> str:
    """One row per task, one column per model: the median (and min) ms of its runs."""
    names = list(timers)
    tasks = list(dict.fromkeys(task for t in timers.values() for task in t.rows))
    lines = ["| task | " + " | ".join(f"{n} median (min) ms" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for task in tasks:
        cells = []
        for name in names:
            ms = np.array(timers[name].rows.get(task, [])) * 1000
            cells.append(f"{np.median(ms):.1f} ({ms.min():.1f}), {len(ms)} runs" if len(ms) else "-")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _say(*a):
    print(*a, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    args.json = False
    if args.bundle is not None and args.model is not None:
        raise ValueError("--bundle runs that one bundle; --model picks among the shipped models: pass one of them")
    if os.environ.get("EMU_EDGE_BUNDLE") and args.model is not None:
        raise ValueError(f"EMU_EDGE_BUNDLE={os.environ['EMU_EDGE_BUNDLE']} makes the demo run that bundle; unset it "
                         "for --model to pick among the shipped models")
    models = []  # (family, name, pipeline, timer)
    try:
        if args.bundle is not None or os.environ.get("EMU_EDGE_BUNDLE"):
            timer = Timer()
            pipe = timer("load bundle", load_pipeline, args, log=_say)
            models.append((pipe.manifest.model.family, pipe.bundle.path.name, pipe, timer))
        else:
            for family in ("emu2", "emu3") if args.model in (None, "both") else (args.model,):
                timer = Timer()
                # The first run exports the shipped checkpoint: a one-time cost, timed apart
                # from loading the bundle (which later runs pay alone).
                fresh = not (cached_bundle_path(family) / "manifest.json").is_file()
                args.bundle = (timer("export the shipped checkpoint (first run only)", default_bundle, log=_say,
                                     family=family) if fresh else default_bundle(log=_say, family=family))
                models.append((family, SHIPPED[family][0], timer("load bundle", load_pipeline, args, log=_say),
                               timer))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"emu-edge demo: error: {e}", file=sys.stderr)
        return 1
    out = args.out
    report, blocks = {}, []
    for family, name, pipe, timer in models:
        folder = out / family
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{name}: {TITLES.get(family, family)}"
        _say(title)
        rows, report[family] = show(pipe, family, folder, timer, args.seed)
        report[family]["latency_s"] = timer.rows
        blocks.append((title, rows))

    contact_sheet(blocks).save(out / "contact_sheet.png")
    table = latency_table({name: timer for _, name, _, timer in models})
    (out / "latency.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    bundles = "; ".join(f"{name}: {pipe.bundle.path}" for _, name, pipe, _ in models)
    print(f"\nlatency on this machine ({models[0][2].device}; {bundles}):\n{table}")
    print(f"\nwrote {len(list(out.rglob('*.png')))} PNGs, contact_sheet.png, latency.md and demo.json to {out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def image_size(pipe, family: str) -> int:
    if family == "emu2":
        return pipe.manifest.model.emu2.image_size
    rows, _ = pipe.family.image_codes_size(None, None)
    return rows * pipe.family.spec.spatial_factor


def show(pipe, family: str, out: Path, timer: Timer, seed: int) -> tuple[list[list], dict]:
    """One model on the demo's inputs -> the contact sheet's rows of (image, label), the report."""
    size = image_size(pipe, family)
    text_row, generated_row, image_row = [], [], []
    report: dict[str, list] = {"caption": [], "ask": [], "generate": [], "autoencode": []}

    _say("  captioning test-split images")
    for i, s in enumerate(data.captioning("test", 4, size=size)):
        image = Image.fromarray(s.segments[0].value)
        got = timer("caption", pipe.generate_text, [image])
        image.save(out / f"caption_{i}.png")
        report["caption"].append({"image": f"caption_{i}.png", "caption": got, "truth": s.answer})
        text_row.append((image, f"caption: {got}"))
        _say(f"    caption_{i}.png: {got!r} (truth {s.answer!r})")

    _say("  answering questions")
    for i, s in enumerate(data.vqa("test", 4, size=size)):
        image = Image.fromarray(s.segments[0].value)
        question = next(seg.value for seg in s.segments if seg.kind == "text")
        got = timer("ask", pipe.generate_text, [image, question])
        image.save(out / f"ask_{i}.png")
        report["ask"].append({"image": f"ask_{i}.png", "question": question, "answer": got, "truth": s.answer})
        text_row.append((image, f"{question} {got}"))
        _say(f"    ask_{i}.png: {question!r} -> {got!r} (truth {s.answer!r})")

    _say("  generating images from text")
    for i, prompt in enumerate(PROMPTS):
        # emu2 reads interleaved items, emu3 a prompt string
        request = [prompt] if family == "emu2" else prompt
        image = timer("generate (text-to-image)", pipe.generate_image, request, seed=seed + i)
        image.save(out / f"generate_{i}.png")
        caption = pipe.generate_text([image])
        report["generate"].append({"prompt": prompt, "image": f"generate_{i}.png", "recaptioned": caption})
        generated_row.append((image, f"'{prompt}'"))
        _say(f"    generate_{i}.png: {prompt!r} (the model captions it {caption!r})")

    sources = data.one_object(data.captioning("test", 12, size=size), 12)
    if family == "emu2":
        _say("  subject-driven edits")
        report["edit"] = []
        for i, (s, edit) in enumerate(zip(sources, EDITS)):
            source = Image.fromarray(s.segments[0].value)
            image = timer("generate (image + text)", pipe.generate_image, [source, edit], seed=seed)
            source.save(out / f"edit_{i}_source.png")
            image.save(out / f"edit_{i}.png")
            report["edit"].append({"source": f"edit_{i}_source.png", "instruction": edit, "image": f"edit_{i}.png"})
            image_row += [(source, "source"), (image, f"'{edit}'")]
    else:
        # Empty cells where emu2's edits are, so both models' autoencode pairs share columns.
        image_row += [(None, "no subject-driven edits: emu3 draws from text")] + [(None, "")] * (2 * len(EDITS) - 1)
    _say("  autoencoding")
    original = Image.fromarray(sources[-1].segments[0].value)
    # emu2: through the vision encoder and the U-Net; emu3: the VQ-VAE's round trip
    recon = timer("autoencode", pipe.autoencode, original, **({"seed": seed} if family == "emu2" else {}))
    original.save(out / "autoencode_source.png")
    recon.save(out / "autoencode.png")
    report["autoencode"].append({"source": "autoencode_source.png", "image": "autoencode.png"})
    image_row += [(original, "original"), (recon, "autoencoded")]
    return [text_row, generated_row, image_row], report


def contact_sheet(blocks: list[tuple[str, list[list[tuple[Image.Image, str]]]]]) -> Image.Image:
    """A block per model: its title, then its rows of images, enlarged (nearest neighbour:
    the pixels are the point) with a label under each; the same task in the same column
    (an image None leaves its cell empty but for the label)."""
    label_h, title_h = 34, 22
    rows = [row for _, block in blocks for row in block]
    columns = max([COLUMNS, *map(len, rows)])
    height = sum(title_h + len(block) * (CELL + label_h) for _, block in blocks)
    sheet = Image.new("RGB", (columns * CELL, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, block in blocks:
        draw.rectangle((0, y, columns * CELL, y + title_h - 4), fill=(230, 230, 230))
        draw.text((4, y + 4), title, fill="black")
        y += title_h
        for row in block:
            for i, (image, label) in enumerate(row):
                x = i * CELL
                if image is not None:
                    sheet.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y))
                words, lines = label.split(), [""]
                for w in words:  # wrap to the cell width
                    if draw.textlength(f"{lines[-1]} {w}".strip()) > CELL - 4:
                        lines.append(w)
                    else:
                        lines[-1] = f"{lines[-1]} {w}".strip()
                draw.multiline_text((x + 2, y + CELL + 1), "\n".join(lines[:3]), fill="black", spacing=0)
            y += CELL + label_h
    return sheet
