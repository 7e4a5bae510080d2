"""`emu-edge data`: write a folder of generated samples (PNG images + prompts.jsonl).

Calibration and the demos read this folder, so it needs nothing but numpy and pillow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import SPLITS
from .tasks import N_FRAMES, TASKS, Sample, check_tasks

README = """\
Samples from `emu-edge data` (split {split}, seed {seed}, {n} samples, {size}x{size} px,
tasks {tasks}). Sample i is task tasks[i % len(tasks)], that task's sample #(i // len(tasks)).

prompts.jsonl has one JSON object per line:
  id            "<split>-<i>"
  task          the task name
  image         the input image (images/<id>.png), or null (text_to_image has none);
                for few-shot it is the query image, for video the first frame
  prompt        the context text: the question, the instruction or the text-to-image
                prompt (for few-shot the shot answers joined by " | "), or null
  answer        the target text, or null when the target is an image
  target_image  the image to generate (images/<id>_target.png), or null
  shots         few-shot only: [{{"image": ..., "answer": ...}}, ...]
  turns         chat only: [{{"question": ..., "answer": ...}}, ...]
  frames        video only: images/<id>_frames.png, the {n_frames} frames side by side
  meta          the sample's attributes (scene, digit, ...) for scoring
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, help=f"one of {', '.join(SPLITS)}")
    parser.add_argument("--n", type=int, required=True, help="number of samples (>= 1)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated tasks, from: {', '.join(TASKS)} (default: all)")


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _save(image: np.ndarray, out: Path, name: str) -> str:
    Image.fromarray(image).save(out / "images" / name)
    return f"images/{name}"


def sample_record(sample: Sample, sample_id: str, out: Path) -> dict:
    """Write the sample's images under out/images and return its prompts.jsonl record."""
    record = {"id": sample_id, "task": sample.task, "image": None, "prompt": None, "answer": sample.answer,
              "target_image": None}
    images = [s.value for s in sample.segments if s.kind == "image"]
    texts = [s.value for s in sample.segments if s.kind == "text"]
    for seg in sample.segments:
        if seg.kind == "target_image":
            record["target_image"] = _save(seg.value, out, f"{sample_id}_target.png")
        elif seg.kind == "frames":
            record["frames"] = _save(np.concatenate(list(seg.value), axis=1), out, f"{sample_id}_frames.png")
            record["image"] = _save(seg.value[0], out, f"{sample_id}.png")
    if images:
        record["image"] = _save(images[-1], out, f"{sample_id}.png")
    if sample.task == "fewshot":
        record["shots"] = [{"image": _save(im, out, f"{sample_id}_shot{k}.png"), "answer": text}
                           for k, (im, text) in enumerate(zip(images[:-1], texts))]
        record["prompt"] = " | ".join(texts)
    elif sample.task == "chat":
        answers = [s.value for s in sample.segments if s.kind == "answer"]
        record["turns"] = [{"question": q, "answer": a} for q, a in zip(texts, answers)]
        record["prompt"], record["answer"] = texts[0], answers[0]
    elif texts:
        record["prompt"] = texts[0]
    record["meta"] = _jsonable(sample.meta)
    return record


def run(args: argparse.Namespace) -> int:
    if args.split not in SPLITS:
        raise SystemExit(f"emu-edge data: unknown split {args.split!r}; choose one of {', '.join(SPLITS)}")
    if args.n < 1:
        raise SystemExit(f"emu-edge data: --n must be >= 1, got {args.n}")
    if args.size < 8:
        raise SystemExit(f"emu-edge data: --size must be >= 8 pixels, got {args.size}")
    if args.seed < 0:
        raise SystemExit(f"emu-edge data: --seed must be >= 0, got {args.seed}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        check_tasks(names)
    except ValueError as err:
        raise SystemExit(f"emu-edge data: {err}") from None
    if not names:
        raise SystemExit(f"emu-edge data: --tasks is empty; choose from {', '.join(TASKS)}")

    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    width = len(str(args.n - 1))
    report_every = max(1, args.n // 20)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(args.n):
            task = names[i % len(names)]
            sample = TASKS[task](args.split, i // len(names), args.seed, args.size)
            f.write(json.dumps(sample_record(sample, f"{args.split}-{i:0{width}d}", out)) + "\n")
            if args.n >= 200 and ((i + 1) % report_every == 0 or i + 1 == args.n):
                print(f"\r{i + 1}/{args.n} samples", end="", file=sys.stderr, flush=True)
    if args.n >= 200:
        print(file=sys.stderr)
    (out / "README.txt").write_text(README.format(split=args.split, seed=args.seed, n=args.n, size=args.size,
                                                  tasks=",".join(names), n_frames=N_FRAMES), encoding="utf-8")
    print(f"wrote {args.n} samples to {out}/prompts.jsonl (images in {out}/images)")
    return 0
