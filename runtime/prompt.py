"""Prompt building: interleaved segments -> token ids, shared by training and the runtime.

The layout of a prompt is data (`PromptLayout`): which special tokens a family uses and
how text, turns and images are written into the sequence. Training writes its layout into
the checkpoint, the exporter copies it into the bundle's manifest, and the runtime executes
the manifest's copy, so the sequences the model was trained on and the ones the runtime
feeds it cannot drift apart. Torch-free: training imports it too.

A layout is lists of parts; a part is a special token's name ("[IMG]"), a piece of text
encoded by the tokenizer ({"text": ":"}), or a run of one token repeated a family-defined
number of times ({"repeat": "<image>", "count": "n_query"}). Emu2's layout, with two
templates (training picks one per task, the runtime per prompt):
- plain:  <s> [IMG] <image>*N [/IMG] a red circle </s>            (captioning, text-to-image,
          <s> a red circle [IMG] <image>*N [/IMG]                   subject-driven generation)
- chat:   <s> [USER]: [IMG] <image>*N [/IMG] what colour is it? [ASSISTANT]: red </s>
          further turns add [USER]: ... [ASSISTANT]: ... </s>  (VQA, chat, few-shot, video)
Every `<image>` position (the layout's `placeholder`) is filled, in order, by one visual
embedding (projected up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMG, IMG_END, IMAGE, USER, ASSISTANT = "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"
EMU2_SPECIAL_TOKENS = (PAD, BOS, EOS, IMG, IMG_END, IMAGE, USER, ASSISTANT)

SYSTEM_SLOT = {"slot": "system"}     # where a caller's system prompt goes in `system`
PART_LISTS = ("begin", "end", "user", "assistant", "image", "frame", "generate_image", "system", "user_end", "answer")

CHAT_TASKS = ("vqa", "chat", "fewshot", "video")
TEMPLATES = ("plain", "chat")


def template_for(task: str) -> str:
    return "chat" if task in CHAT_TASKS else "plain"


class PromptLayoutError(ValueError):
    """A prompt layout names a token the tokenizer lacks, or a part this runtime cannot run."""


@dataclass
class PromptLayout:
    """How a family writes a prompt, as data (see the module docstring for parts)."""

    tokens: dict[str, int]            # every special token the layout names -> its id
    begin: list                       # the sequence start
    end: list                         # after an answer (end of turn)
    user: list                        # chat template: opens a user turn
    assistant: list                   # chat template: opens the answer
    image: list                       # one image
    frame: list                       # one video frame
    generate_image: list              # the end of a prompt whose answer is an image
    placeholder: str | None = None    # the token whose positions take visual embeddings
    text_prefix: str = " "            # prepended to each stripped text before tokenizing
    # Chat templates rendered at export (emu3): a caller's system prompt, where its text is
    # the part {"slot": "system"} ([]: the template has none); what closes a user turn;
    # what opens an earlier answer written back into a prompt (the generation opening is
    # `assistant`); what follows each text of a turn; whether a turn's images go first.
    system: list = field(default_factory=list)
    user_end: list = field(default_factory=list)
    answer: list = field(default_factory=list)
    text_suffix: str = ""
    images_first: bool = False        # a turn's images before its texts, whatever the items' order

    @classmethod
    def from_dict(cls, data: dict) -> PromptLayout:
        if not isinstance(data, dict):
            raise PromptLayoutError(f"a prompt layout is a JSON object, got {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise PromptLayoutError(f"unknown prompt layout field(s) {unknown}; this runtime knows {sorted(names)}")
        try:
            layout = cls(**data)
        except TypeError as e:
            raise PromptLayoutError(f"prompt layout: {e}") from e
        layout.validate()
        return layout

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not isinstance(self.tokens, dict) or not all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in self.tokens.items()):
            raise PromptLayoutError("prompt layout tokens must map token names to ids >= 0")
        for key in PART_LISTS:
            parts = getattr(self, key)
            if not isinstance(parts, list):
                raise PromptLayoutError(f"prompt layout {key!r} must be a list of parts")
            for part in parts:
                self._check_part(key, part)
        if self.placeholder is not None and self.placeholder not in self.tokens:
            raise PromptLayoutError(f"prompt layout placeholder {self.placeholder!r} is not among its tokens")
        for key in ("text_prefix", "text_suffix"):
            if not isinstance(getattr(self, key), str):
                raise PromptLayoutError(f"prompt layout {key} must be a string")
        if not isinstance(self.images_first, bool):
            raise PromptLayoutError("prompt layout images_first must be true or false")
        if self.system and sum(p == SYSTEM_SLOT for p in self.system) != 1:
            raise PromptLayoutError('prompt layout \'system\' must hold the part {"slot": "system"} once')

    def _check_part(self, key: str, part) -> None:
        if isinstance(part, str):
            if part not in self.tokens:
                raise PromptLayoutError(f"prompt layout {key!r} names {part!r}, which is not among its tokens "
                                        f"({', '.join(self.tokens)})")
        elif isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
            pass
        elif key == "system" and part == SYSTEM_SLOT:
            pass
        elif (isinstance(part, dict) and set(part) == {"repeat", "count"} and isinstance(part["repeat"], str)
              and part["repeat"] in self.tokens
              and isinstance(part["count"], str)):
            pass
        else:
            raise PromptLayoutError(f"prompt layout {key!r} has a part {part!r}; a part is a token name, "
                                    '{"text": ...} or {"repeat": TOKEN, "count": NAME}')

    def token_id(self, name: str) -> int | None:
        return self.tokens.get(name)

    @property
    def placeholder_id(self) -> int | None:
        """The id whose positions take visual embeddings (None: a layout without one)."""
        return self.tokens.get(self.placeholder) if self.placeholder else None


def emu2_layout(token_ids: dict[str, int]) -> PromptLayout:
    """Emu2's layout over a tokenizer's ids for its eight special tokens."""
    missing = [t for t in EMU2_SPECIAL_TOKENS if t not in token_ids]
    if missing:
        raise PromptLayoutError(f"tokenizer lacks the special tokens {missing}")
    return PromptLayout(
        tokens={t: int(token_ids[t]) for t in EMU2_SPECIAL_TOKENS},
        begin=[BOS], end=[EOS],
        user=[USER, {"text": ":"}], assistant=[ASSISTANT, {"text": ":"}],
        image=[IMG, {"repeat": IMAGE, "count": "n_query"}, IMG_END],
        frame=[IMG, {"repeat": IMAGE, "count": "frame_n_query"}, IMG_END],
        generate_image=[IMG], placeholder=IMAGE)


@dataclass
class Encoded:
    ids: list[int] = field(default_factory=list)
    # Per position: the id to predict next (-100: no loss). Only answers and their </s>.
    targets: list[int] = field(default_factory=list)
    # Per position: True where the hidden state regresses the embedding at the next position.
    regress: list[bool] = field(default_factory=list)
    # Visual inputs in order of appearance: ("image", array) or ("frames", array [T,H,W,3]).
    visuals: list[tuple[str, object]] = field(default_factory=list)
    # Index into `visuals` of each image whose embeddings are regression targets.
    target_visuals: list[int] = field(default_factory=list)


class PromptBuilder:
    """Turns segments into ids by executing a PromptLayout. `encode_text` maps text to ids
    (the tokenizer's, without special tokens); `counts` gives each repeat's length by name
    (emu2: n_query, frame_n_query)."""

    def __init__(self, layout: PromptLayout, encode_text, counts: dict[str, int]):
        self.layout = layout
        self.encode_text = encode_text
        self.counts = dict(counts)
        self._parts: dict[str, list[int]] = {}
        for key in ("begin", "end", "user", "assistant", "image", "frame", "generate_image"):
            self._parts[key] = self._expand(getattr(layout, key))
        self.placeholder_id = layout.placeholder_id
        self.begin_ids = self._parts["begin"]

    def _expand(self, parts: list) -> list[int]:
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids.append(self.layout.tokens[part])
            elif "text" in part:
                ids += self.encode_text(part["text"])
            else:
                if part["count"] not in self.counts:
                    raise PromptLayoutError(f"the prompt layout repeats {part['repeat']!r} {part['count']!r} times, "
                                            f"a count this model does not give ({', '.join(self.counts) or 'none'})")
                ids += [self.layout.tokens[part["repeat"]]] * self.counts[part["count"]]
        return ids

    def encode(self, task: str, segments, generate: str | None = None) -> Encoded:
        """segments: iterable of (kind, value) with kind in text, answer, image, frames,
        target_image. generate: None (training), "text" (end with the prompt for an
        answer) or "image" (end ready to regress the image's embeddings)."""
        out = Encoded()
        chat = template_for(task) == "chat"
        parts = self._parts
        self._add(out, parts["begin"])
        in_user_turn = False
        for kind, value in segments:
            if chat and kind != "answer" and not in_user_turn:
                self._add(out, parts["user"])
                in_user_turn = True
            if kind == "text":
                self._add(out, self._text(value))
            elif kind == "answer":
                if chat:
                    self._add(out, parts["assistant"])
                    in_user_turn = False
                self._add(out, self._text(value), loss=True)
                self._add(out, parts["end"], loss=True)
            elif kind == "image":
                out.visuals.append(("image", value))
                self._add(out, parts["image"])
            elif kind == "frames":
                out.visuals.append(("frames", value))
                for _ in range(len(value)):
                    self._add(out, parts["frame"])
            elif kind == "target_image":
                out.target_visuals.append(len(out.visuals))
                out.visuals.append(("image", value))
                # Every position from the image's first token up to its last placeholder
                # predicts the next embedding ([IMG] the first, each <image> the next); the
                # last placeholder predicts nothing (what follows is implied, not trained).
                image = parts["image"]
                last = len(image) - 1 - image[::-1].index(self.placeholder_id)
                self._add(out, image[:last], regress=True)
                self._add(out, image[last:])
            else:
                raise ValueError(f"unknown segment kind {kind!r}")
        if generate == "text" and chat:
            self._add(out, parts["assistant"])
        elif generate == "image":
            self._add(out, parts["generate_image"])
        elif generate not in (None, "text"):
            raise ValueError(f"generate must be None, 'text' or 'image', not {generate!r}")
        return out

    def _text(self, value: str) -> list[int]:
        return self.encode_text(self.layout.text_prefix + value.strip())

    def _add(self, out: Encoded, ids: list[int], loss: bool = False, regress: bool = False):
        # A target at position t is the token at t+1: mark the previous position.
        for i in ids:
            if loss and out.ids:
                out.targets[-1] = i
            out.ids.append(i)
            out.targets.append(-100)
            out.regress.append(regress)


def emu2_builder(token_ids: dict[str, int], encode_text, n_query: int, frame_n_query: int) -> PromptBuilder:
    """The PromptBuilder of an Emu2-style model, from its tokenizer's special-token ids."""
    return PromptBuilder(emu2_layout(token_ids), encode_text, {"n_query": n_query, "frame_n_query": frame_n_query})
