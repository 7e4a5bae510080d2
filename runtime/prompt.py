"""Prompt building: interleaved segments -> token ids, shared by training and the runtime.

One function turns a list of segments (text, images, video frames, answers, images to
generate) into token ids, so the sequences the model was trained on and the ones the
runtime feeds it cannot drift apart. Torch-free: training imports it too.

Two templates (the manifest records which task uses which):
- plain:  <s> [IMG] <image>*N [/IMG] a red circle </s>            (captioning, text-to-image,
          <s> a red circle [IMG] <image>*N [/IMG]                   subject-driven generation)
- chat:   <s> [USER]: [IMG] <image>*N [/IMG] what colour is it? [ASSISTANT]: red </s>
          further turns add [USER]: ... [ASSISTANT]: ... </s>  (VQA, chat, few-shot, video)
Every `<image>` position is filled, in order, by one visual embedding (projected up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMG, IMG_END, IMAGE, USER, ASSISTANT = "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMG, IMG_END, IMAGE, USER, ASSISTANT)

CHAT_TASKS = ("vqa", "chat", "fewshot", "video")
TEMPLATES = {
    "plain": "<s> {content} </s>; images as [IMG] <image>*N [/IMG]",
    "chat": "<s> [USER]: {content} [ASSISTANT]: {answer} </s> (repeated per turn)",
}


def template_for(task: str) -> str:
    return "chat" if task in CHAT_TASKS else "plain"


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
    """Turns segments into ids. `token_ids` maps every special token to its id; `encode_text`
    maps text to ids (the tokenizer's, without special tokens)."""

    def __init__(self, token_ids: dict[str, int], encode_text, n_query: int, frame_n_query: int):
        missing = [t for t in SPECIAL_TOKENS if t not in token_ids]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.token_ids = dict(token_ids)
        self.encode_text = encode_text
        self.n_query = n_query
        self.frame_n_query = frame_n_query
        self._colon = encode_text(":")

    def encode(self, task: str, segments, generate: str | None = None) -> Encoded:
        """segments: iterable of (kind, value) with kind in text, answer, image, frames,
        target_image. generate: None (training), "text" (end with the prompt for an
        answer) or "image" (end with [IMG], ready to regress N embeddings)."""
        out = Encoded()
        chat = template_for(task) == "chat"
        tid = self.token_ids
        self._add(out, [tid[BOS]])
        in_user_turn = False
        for kind, value in segments:
            if chat and kind != "answer" and not in_user_turn:
                self._add(out, [tid[USER], *self._colon])
                in_user_turn = True
            if kind == "text":
                self._add(out, self.encode_text(" " + value.strip()))
            elif kind == "answer":
                if chat:
                    self._add(out, [tid[ASSISTANT], *self._colon])
                    in_user_turn = False
                self._add(out, self.encode_text(" " + value.strip()), loss=True)
                self._add(out, [tid[EOS]], loss=True)
            elif kind == "image":
                out.visuals.append(("image", value))
                self._add(out, [tid[IMG], *[tid[IMAGE]] * self.n_query, tid[IMG_END]])
            elif kind == "frames":
                out.visuals.append(("frames", value))
                for _ in range(len(value)):
                    self._add(out, [tid[IMG], *[tid[IMAGE]] * self.frame_n_query, tid[IMG_END]])
            elif kind == "target_image":
                out.target_visuals.append(len(out.visuals))
                out.visuals.append(("image", value))
                # [IMG] predicts the first embedding, each <image> the next; the last
                # <image> predicts nothing (</IMG> is implied and not trained).
                self._add(out, [tid[IMG]], regress=True)
                self._add(out, [tid[IMAGE]] * (self.n_query - 1), regress=True)
                self._add(out, [tid[IMAGE], tid[IMG_END]])
            else:
                raise ValueError(f"unknown segment kind {kind!r}")
        if generate == "text" and chat:
            self._add(out, [tid[ASSISTANT], *self._colon])
        elif generate == "image":
            self._add(out, [tid[IMG]])
        elif generate not in (None, "text"):
            raise ValueError(f"generate must be None, 'text' or 'image', not {generate!r}")
        return out

    def _add(self, out: Encoded, ids: list[int], loss: bool = False, regress: bool = False):
        # A target at position t is the token at t+1: mark the previous position.
        for i in ids:
            if loss and out.ids:
                out.targets[-1] = i
            out.ids.append(i)
            out.targets.append(-100)
            out.regress.append(regress)
