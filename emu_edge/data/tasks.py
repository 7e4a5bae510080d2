"""Task generators: each turns (split, index, seed) into one `Sample`, deterministically.

Sample k of a stream is seeded by `np.random.default_rng([seed, split_id, task_id, k])`, so it
does not depend on how many samples were asked for, and training can resume mid-stream.
Every scene is drawn again (from the same generator, so still deterministic) until its
stable hash puts it in the requested split; see `scenes.split_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from . import grammar as g
from .handwritten import digit_image, digit_label, digit_split_indices
from .scenes import (COLOURS, GRID, SHAPES, SIZES, Obj, Scene, centre_range, check_split, random_object,
                     random_scene, render, render_objects, scene_split, split_of)

SEGMENT_KINDS = ("image", "frames", "text", "answer", "target_image")
N_FRAMES = 8
_MAX_TRIES = 100_000  # a 10% split needs ~10 draws (~100 when two scenes must both land in it)
# Fixed ids keep each task's random stream independent of the others and of dict order.
TASK_IDS = {"captioning": 1, "text_to_image": 2, "vqa": 3, "fewshot": 4, "chat": 5, "video": 6,
            "subject": 7, "digits": 8}
_MIXTURE_ID = 100


@dataclass(frozen=True, eq=False)
class Segment:
    """kind: "image" (uint8 [H,W,3]), "frames" (uint8 [T,H,W,3]), "text" (str, context),
    "answer" (str, the target text), "target_image" (uint8 [H,W,3], the image to generate)."""

    kind: str
    value: Any

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"unknown segment kind {self.kind!r}; choose one of {SEGMENT_KINDS}")


@dataclass(frozen=True, eq=False)
class Sample:
    task: str
    segments: tuple[Segment, ...]
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        """The last answer segment's text (the one an eval scores), or None."""
        answers = [s.value for s in self.segments if s.kind == "answer"]
        return answers[-1] if answers else None


def _rng(task: str, split: str, index: int, seed: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0 (got index={index}, seed={seed})")
    return np.random.default_rng([seed, check_split(split), TASK_IDS[task], index])


def _scene_in_split(rng: np.random.Generator, split: str, n_objects: int) -> Scene:
    for _ in range(_MAX_TRIES):
        scene = random_scene(rng, n_objects)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError(f"no {n_objects}-object scene found for split {split!r}")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _attrs(o: Obj) -> dict:
    return {"size": o.size, "colour": o.colour, "shape": o.shape}


def _meta(split: str, index: int, **kw) -> dict:
    return {"split": split, "index": index, **kw}


# ---- captioning -------------------------------------------------------------------------

def captioning_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """image -> full caption with sizes; ~60% one object, ~40% two."""
    rng = _rng("captioning", split, index, seed)
    scene = _scene_in_split(rng, split, 1 if rng.random() < 0.6 else 2)
    text = g.caption(scene)
    return Sample("captioning", (Segment("image", render(scene, size)), Segment("answer", text)),
                  _meta(split, index, scene=scene, caption=text))


# ---- text to image ----------------------------------------------------------------------

def text_to_image_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """prompt (half full form, half short form without sizes) -> target image; ~80% one object."""
    rng = _rng("text_to_image", split, index, seed)
    scene = _scene_in_split(rng, split, 1 if rng.random() < 0.8 else 2)
    with_size = bool(rng.random() < 0.5)
    prompt = g.caption(scene, with_size=with_size)
    meta = _meta(split, index, scene=scene, prompt=prompt, with_size=with_size,
                 objects=[_attrs(o) for o in scene.objects])
    if len(scene.objects) == 1:
        meta.update(_attrs(scene.objects[0]))
    return Sample("text_to_image", (Segment("text", prompt), Segment("target_image", render(scene, size))), meta)


# ---- visual question answering ----------------------------------------------------------

def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every question with exactly one right answer for `scene`, by type:
    {"colour" | "shape" | "size" | "count" | "position": [(question, answer), ...]}."""
    objs = scene.objects
    by_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    by_colour = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
    by_both = [o for o in objs if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1]
    out = {
        "colour": [(g.Q_COLOUR.format(shape=o.shape), o.colour) for o in by_shape],
        "shape": [(g.Q_SHAPE.format(colour=o.colour), o.shape) for o in by_colour],
        "size": [(g.Q_SIZE.format(colour=o.colour, shape=o.shape), o.size) for o in by_both],
        "count": [(g.Q_COUNT, g.COUNT_WORDS[len(objs) - 1])],
        "position": [],
    }
    if len(objs) == 2:
        out["position"] = [(g.Q_WHERE.format(colour=o.colour, shape=o.shape), side)
                           for o, side in zip(objs, g.SIDES) if o in by_both]
    else:
        o = objs[0]
        # An object near a centre line has no clear quadrant, so it gets no position question.
        if abs(o.x - 0.5) >= 0.1 and abs(o.y - 0.5) >= 0.1:
            quadrant = ("top " if o.y < 0.5 else "bottom ") + ("left" if o.x < 0.5 else "right")
            out["position"] = [(g.Q_WHERE.format(colour=o.colour, shape=o.shape), quadrant)]
    return {k: v for k, v in out.items() if v}


def vqa_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """image + question -> one- or two-word answer; the question type is uniform over the
    types the scene can answer unambiguously."""
    rng = _rng("vqa", split, index, seed)
    scene = _scene_in_split(rng, split, 1 if rng.random() < 0.5 else 2)
    pool = questions(scene)
    qtype = _pick(rng, sorted(pool))
    question, answer = _pick(rng, pool[qtype])
    return Sample("vqa", (Segment("image", render(scene, size)), Segment("text", question), Segment("answer", answer)),
                  _meta(split, index, scene=scene, question_type=qtype, question=question))


# ---- few-shot ---------------------------------------------------------------------------

FEWSHOT_PATTERNS = ("colour", "shape", "colour shape")


def _fewshot_answer(pattern: str, o: Obj) -> str:
    return {"colour": o.colour, "shape": o.shape, "colour shape": f"{o.colour} {o.shape}"}[pattern]


def fewshot_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """2-4 (image, answer) shots sharing a hidden pattern, then a query image -> its answer.
    The pattern is visible in the shots' answers (colour words, shape words, or both)."""
    rng = _rng("fewshot", split, index, seed)
    pattern = _pick(rng, FEWSHOT_PATTERNS)
    n_shots = int(rng.integers(2, 5))
    scenes = [_scene_in_split(rng, split, 1) for _ in range(n_shots + 1)]
    segments: list[Segment] = []
    for scene in scenes[:-1]:
        segments += [Segment("image", render(scene, size)), Segment("text", _fewshot_answer(pattern, scene.objects[0]))]
    segments += [Segment("image", render(scenes[-1], size)), Segment("answer", _fewshot_answer(pattern, scenes[-1].objects[0]))]
    return Sample("fewshot", tuple(segments),
                  _meta(split, index, pattern=pattern, n_shots=n_shots, shot_scenes=scenes[:-1], scene=scenes[-1]))


# ---- chat -------------------------------------------------------------------------------

def chat_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """image, then 2-3 turns (question -> answer) about it, all of different types; half the
    conversations open with "what is in the image?" (answered with the full caption)."""
    rng = _rng("chat", split, index, seed)
    scene = _scene_in_split(rng, split, 1 if rng.random() < 0.5 else 2)
    n_turns = int(rng.integers(2, 4))
    pool = questions(scene)
    pool["describe"] = [(g.Q_DESCRIBE, g.caption(scene))]
    types = sorted(pool)
    order = [types[i] for i in rng.permutation(len(types))]
    if rng.random() < 0.5:
        order.remove("describe")
        order.insert(0, "describe")
    turns = [_pick(rng, pool[t]) for t in order[:n_turns]]
    segments = [Segment("image", render(scene, size))]
    for q, a in turns:
        segments += [Segment("text", q), Segment("answer", a)]
    return Sample("chat", tuple(segments), _meta(split, index, scene=scene, turns=turns))


# ---- video ------------------------------------------------------------------------------

_MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def video_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """8 frames of one shape moving in a straight line -> "a red circle moving left"."""
    rng = _rng("video", split, index, seed)
    for _ in range(_MAX_TRIES):
        start = random_object(rng)
        direction = _pick(rng, g.DIRECTIONS)
        step = int(rng.integers(2, 4)) / GRID  # 2-3 grid cells a frame: 7-10 px over a clip at 32 px
        dx, dy = _MOTION[direction]
        travel = step * (N_FRAMES - 1)
        lo, hi = centre_range(start.size)
        # Start far enough from the edge the object heads for that it stays inside.
        x0 = start.x if dx == 0 else float(np.clip(start.x, lo + travel * (dx < 0), hi - travel * (dx > 0)))
        y0 = start.y if dy == 0 else float(np.clip(start.y, lo + travel * (dy < 0), hi - travel * (dy > 0)))
        key = ("video", start.shape, start.colour, start.size, x0, y0, direction, step)
        if split_of(key) == split:
            break
    else:
        raise RuntimeError(f"no video found for split {split!r}")
    path = [replace(start, x=x0 + dx * step * t, y=y0 + dy * step * t) for t in range(N_FRAMES)]
    frames = np.stack([render_objects([o], size) for o in path])
    text = g.motion_caption(start.colour, start.shape, direction)
    return Sample("video", (Segment("frames", frames), Segment("answer", text)),
                  _meta(split, index, direction=direction, step=step, path=path, caption=text, **_attrs(start)))


# ---- subject-driven editing -------------------------------------------------------------

def subject_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """source image of one object + instruction ("make it blue", "as a square", "make it
    small") -> target image of the same object, same place, with only that attribute changed."""
    rng = _rng("subject", split, index, seed)
    for _ in range(_MAX_TRIES):
        # The position is drawn for a large object so a "make it large" edit still fits.
        placed = random_object(rng, size="large")
        source = replace(placed, size=_pick(rng, SIZES))
        change = _pick(rng, ("colour", "shape", "size"))
        if change == "colour":
            new = _pick(rng, [c for c in COLOURS if c != source.colour])
            target, instruction = replace(source, colour=new), g.I_COLOUR.format(colour=new)
        elif change == "shape":
            new = _pick(rng, [s for s in SHAPES if s != source.shape])
            target, instruction = replace(source, shape=new), g.I_SHAPE.format(shape=new)
        else:
            new = "small" if source.size == "large" else "large"
            target, instruction = replace(source, size=new), g.I_SIZE.format(size=new)
        src_scene, tgt_scene = Scene((source,)), Scene((target,))
        if scene_split(src_scene) == split and scene_split(tgt_scene) == split:
            break
    else:
        raise RuntimeError(f"no subject edit found for split {split!r}")
    return Sample("subject",
                  (Segment("image", render(src_scene, size)), Segment("text", instruction),
                   Segment("target_image", render(tgt_scene, size))),
                  _meta(split, index, change=change, instruction=instruction, source=_attrs(source),
                        target=_attrs(target), source_scene=src_scene, scene=tgt_scene))


# ---- handwritten digits -----------------------------------------------------------------

def digits_one(split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """real handwritten digit image -> "a handwritten digit seven"."""
    rng = _rng("digits", split, index, seed)
    pool = digit_split_indices(split)
    digit_index = int(pool[rng.integers(len(pool))])
    digit = digit_label(digit_index)
    text = g.digit_caption(digit)
    return Sample("digits", (Segment("image", digit_image(digit_index, size)), Segment("answer", text)),
                  _meta(split, index, digit=digit, digit_index=digit_index, caption=text))


# ---- list forms, registry and mixture ---------------------------------------------------

def _many(one: Callable[..., Sample], split: str, n: int, seed: int, size: int) -> list[Sample]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [one(split, i, seed, size) for i in range(n)]


def captioning(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(captioning_one, split, n, seed, size)


def text_to_image(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(text_to_image_one, split, n, seed, size)


def vqa(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(vqa_one, split, n, seed, size)


def one_object(samples: list[Sample], n: int) -> list[Sample]:
    """The first n samples whose scene has one object (what the judge can read)."""
    return [s for s in samples if len(s.meta["scene"].objects) == 1][:n]


def fewshot(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(fewshot_one, split, n, seed, size)


def chat(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(chat_one, split, n, seed, size)


def video(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(video_one, split, n, seed, size)


def subject(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(subject_one, split, n, seed, size)


def digits(split: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    return _many(digits_one, split, n, seed, size)


TASKS: dict[str, Callable[..., Sample]] = {
    "captioning": captioning_one,
    "text_to_image": text_to_image_one,
    "vqa": vqa_one,
    "fewshot": fewshot_one,
    "chat": chat_one,
    "video": video_one,
    "subject": subject_one,
    "digits": digits_one,
}


def check_tasks(names) -> list[str]:
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    return list(names)


def mixture(task_weights: dict[str, float], split: str, index: int, seed: int = 0, size: int = 32) -> Sample:
    """Sample #index of a weighted stream of tasks. The task is drawn from its own seeded
    stream; the sample is then that task's sample #index, so it is the same whatever else
    is in the mixture."""
    names = sorted(check_tasks(task_weights))  # sorted: the stream must not depend on dict order
    weights = np.array([float(task_weights[t]) for t in names])
    if not len(names) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {task_weights}")
    rng = np.random.default_rng([seed, check_split(split), _MIXTURE_ID, index])
    task = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    return TASKS[task](split, index, seed, size)
