"""The caption grammar and the closed set of sentences the data can produce.

Grammar (all lower case, single spaces, no final full stop)::

    object       := "a " [size " "] colour " " shape
    scene        := object                      one object
                  | object " left of " object   two objects, the left one first
    digit        := "a handwritten digit " digit_word
    motion       := "a " colour " " shape " moving " direction
    size         := "small" | "large"
    colour       := "red" | "green" | "blue" | "yellow" | "purple" | "orange"
    shape        := "circle" | "square" | "triangle" | "diamond"
    direction    := "left" | "right" | "up" | "down"
    digit_word   := "zero" | "one" | ... | "nine"

Captions of images always carry sizes ("a large red circle"); text-to-image prompts come
half with sizes and half in the short form without them ("a red circle left of a blue square").
"""

from __future__ import annotations

from .scenes import COLOURS, SHAPES, SIZES, Obj, Scene

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SIDES: tuple[str, ...] = ("left", "right")
COUNT_WORDS: tuple[str, ...] = ("one", "two")

# Question and instruction templates; `corpus()` enumerates them, the generators fill them.
Q_COLOUR = "what colour is the {shape}?"
Q_SHAPE = "what shape is the {colour} object?"
Q_SIZE = "what size is the {colour} {shape}?"
Q_COUNT = "how many shapes are there?"
Q_WHERE = "where is the {colour} {shape}?"
Q_DESCRIBE = "what is in the image?"
I_COLOUR = "make it {colour}"
I_SHAPE = "as a {shape}"
I_SIZE = "make it {size}"


def describe(size: str | None, colour: str, shape: str) -> str:
    return f"a {size} {colour} {shape}" if size else f"a {colour} {shape}"


def describe_obj(o: Obj, with_size: bool = True) -> str:
    return describe(o.size if with_size else None, o.colour, o.shape)


def caption(scene: Scene, with_size: bool = True) -> str:
    """"a large red circle" or "a small red circle left of a large blue square"."""
    return " left of ".join(describe_obj(o, with_size) for o in scene.objects)


def digit_caption(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def motion_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def _parse_object(words: list[str]):
    if len(words) == 3 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES:
        return (None, words[1], words[2])
    if len(words) == 4 and words[0] == "a" and words[1] in SIZES and words[2] in COLOURS and words[3] in SHAPES:
        return (words[1], words[2], words[3])
    return None


def parse_caption(text: str) -> list[tuple[str | None, str, str]] | None:
    """Caption -> [(size or None, colour, shape), ...] left to right, or None if it does not
    follow the grammar. Case, surrounding space and a final full stop are forgiven."""
    text = " ".join(text.strip().lower().rstrip(".").split())
    parts = text.split(" left of ")
    if not 1 <= len(parts) <= 2:
        return None
    objects = [_parse_object(p.split()) for p in parts]
    return None if any(o is None for o in objects) else objects


def _object_phrases(with_size: bool) -> list[str]:
    sizes = SIZES if with_size else (None,)
    return [describe(s, c, sh) for s in sizes for c in COLOURS for sh in SHAPES]


def corpus() -> list[str]:
    """Every sentence shape the generators can emit, enumerated (not sampled) so no word is
    missing from a tokenizer trained on it."""
    out: list[str] = []
    for with_size in (True, False):
        singles = _object_phrases(with_size)
        out += singles
        out += [f"{a} left of {b}" for a in singles for b in singles]
    out += [digit_caption(d) for d in range(10)]
    out += [motion_caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    out += [Q_COLOUR.format(shape=s) for s in SHAPES]
    out += [Q_SHAPE.format(colour=c) for c in COLOURS]
    out += [Q_SIZE.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    out += [Q_WHERE.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    out += [Q_COUNT, Q_DESCRIBE]
    out += [I_COLOUR.format(colour=c) for c in COLOURS]
    out += [I_SHAPE.format(shape=s) for s in SHAPES]
    out += [I_SIZE.format(size=s) for s in SIZES]
    # short answers: VQA words and the few-shot patterns ("red", "circle", "red circle")
    out += list(COLOURS) + list(SHAPES) + list(SIZES) + list(COUNT_WORDS) + list(SIDES) + list(QUADRANTS)
    out += [f"{c} {s}" for c in COLOURS for s in SHAPES]
    out += list(DIGIT_WORDS)
    return list(dict.fromkeys(out))
