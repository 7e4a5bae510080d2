"""Reading a calibration folder: what `emu-edge data` writes (prompts.jsonl + images/).

Each line of prompts.jsonl becomes one request to the model, built the way the runtime
serves that task, so the recorded graph inputs are the ones a user's request produces:

    captioning, digits            [image]                  -> text (plain template)
    vqa, video, chat              [image, question]        -> text (chat template)
    fewshot                       [shot, answer, ..., query image] -> text
    text_to_image                 [prompt]                 -> image
    subject                       [image, instruction]     -> image

A text-only bundle (export-hf --llm) gets the text of each record (its prompt, else its
answer) as a plain prompt. Images must already be the model's size: the runtime would
resize them, but calibration ranges taken on resampled pixels are not the ranges of the
images the model was trained and will be used on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS_FILE = "prompts.jsonl"
IMAGE_TASKS = ("text_to_image", "subject")


class CalibrationDataError(ValueError):
    """The calibration folder is missing, empty or does not fit the bundle."""


@dataclass
class Request:
    record: int                 # line number in prompts.jsonl (0-based)
    id: str
    task: str
    generate: str               # "text" or "image"
    items: list = field(default_factory=list)   # interleaved str and uint8 [H, W, 3] images
    text: str | None = None     # the prompt for a text-only bundle
    ids: list[int] | None = None  # ... as token ids (calibrate fills them in)


def read_requests(folder: str | Path, image_size: int | None = None, multimodal: bool = True) -> list[Request]:
    """The requests of a calibration folder. image_size: the model's input side, checked
    against every image; multimodal=False reads only the text."""
    folder = Path(folder)
    prompts = folder / PROMPTS_FILE
    if not folder.is_dir():
        raise CalibrationDataError(f"calibration folder {folder} does not exist; write one with "
                                   f"emu-edge data --split val --n 64 --out {folder}")
    if not prompts.is_file():
        raise CalibrationDataError(f"{folder} has no {PROMPTS_FILE}; a calibration folder is what "
                                   f"emu-edge data --split val --n 64 --out DIR writes")
    lines = [(i, line) for i, line in enumerate(prompts.read_text(encoding="utf-8").splitlines()) if line.strip()]
    if not lines:
        raise CalibrationDataError(f"{prompts} is empty: the calibration set needs at least one sample "
                                   "(emu-edge data --split val --n 64 --out DIR)")
    requests = []
    for i, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{prompts} line {i + 1} is not JSON: {e}") from e
        if not isinstance(record, dict) or "task" not in record:
            raise CalibrationDataError(f"{prompts} line {i + 1} has no 'task'; is it a file from emu-edge data?")
        request = (_multimodal_request if multimodal else _text_request)(folder, i, record, image_size)
        if request is not None:
            requests.append(request)
    if not requests:
        kind = "multimodal" if multimodal else "text"
        raise CalibrationDataError(f"{prompts} has {len(lines)} record(s) but none usable for a {kind} bundle "
                                   "(records need an image or a prompt)")
    return requests


def _text_request(folder: Path, i: int, record: dict, image_size) -> Request | None:
    text = record.get("prompt") or record.get("answer")
    if not isinstance(text, str) or not text.strip():
        return None
    return Request(record=i, id=str(record.get("id", i)), task=record["task"], generate="text", text=text.strip())


def _multimodal_request(folder: Path, i: int, record: dict, image_size) -> Request | None:
    task = record["task"]
    prompt = record.get("prompt")
    image = _image(folder, record.get("image"), image_size, i) if record.get("image") else None
    if task in IMAGE_TASKS:
        if not prompt:
            return None
        items = ([image] if image is not None else []) + [prompt]
        return Request(record=i, id=str(record.get("id", i)), task=task, generate="image", items=items)
    if image is None:
        return None
    if task == "fewshot" and record.get("shots"):
        items = []
        for shot in record["shots"]:
            items += [_image(folder, shot["image"], image_size, i), shot["answer"]]
        items.append(image)
    elif task in ("captioning", "digits") or not prompt:
        items = [image]
    else:
        # chat records carry their first question as the prompt; video its first frame.
        items = [image, prompt]
    return Request(record=i, id=str(record.get("id", i)), task=task, generate="text", items=items)


def _image(folder: Path, relative: str, image_size: int | None, i: int) -> np.ndarray:
    path = folder / relative
    if not path.is_file():
        raise CalibrationDataError(f"{path} (line {i + 1} of {PROMPTS_FILE}) does not exist")
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise CalibrationDataError(f"{path} is not a readable image: {e}") from e
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        h, w = image.shape[:2]
        raise CalibrationDataError(
            f"{path} is {w}x{h} but the model takes {image_size}x{image_size} images: calibrate on what the "
            f"model sees (emu-edge data --split val --n 64 --size {image_size} --out DIR)")
    return image


def token_prompts(pipe, texts: list[str], length: int = 12, seed: int = 0) -> tuple[list[list[int]], str]:
    """Token-id prompts for a text-only bundle: the texts through its tokenizer, or, when
    the tokenizer does not know their words (most prompts collapse to one or two ids,
    e.g. all unknown), seeded random ids of ordinary tokens, so that the graphs see real
    activations rather than the embedding of the unknown token over and over."""
    rows = [pipe.tokenizer.encode(t).ids for t in texts]
    if rows and sum(len(set(r)) > 2 for r in rows) >= len(rows) / 2:
        return rows, "the texts, tokenized"
    model = pipe.manifest.model
    special = model.special_ids()
    pool = np.array([t for t in range(model.vocab_size) if t not in special])
    rng = np.random.default_rng(seed)
    return ([rng.choice(pool, size=length).tolist() for _ in texts],
            "random token ids (the tokenizer does not know the texts' words)")
