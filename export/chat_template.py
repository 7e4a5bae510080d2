"""A folder's chat template, rendered at export into the manifest's prompt layout
(runtime.prompt.PromptLayout), so the runtime writes chat prompts without jinja2.

The template is rendered (by transformers' own jinja environment) on conversations whose
texts are markers; the strings between the markers are the layout's parts:

    begin      before anything (after the tokenizer's BOS, which the processor writes)
    system     around a system message's text ({"slot": "system"})
    user       opens a user turn;  user_end closes it
    text_suffix  follows each text of a turn
    image      an image item: the processor's placeholder, expanded to the image's block
    images_first  whether a turn's images come before its texts (Emu3-Chat's template)
    assistant  the generation opening (add_generation_prompt)
    answer     opens an earlier answer; end closes it

Then the layout re-renders every marker conversation and must give the template's exact
string; a template it cannot express (one whose turns depend on their position, say)
gives no layout, with a printed line saying why.
"""

from __future__ import annotations

import json
from pathlib import Path

from emu_edge.runtime.prompt import SYSTEM_SLOT, PromptLayout

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_M = ("QQMARKA", "QQMARKB", "QQMARKC", "QQMARKD", "QQMARKE", "QQMARKF")


class ChatTemplateError(ValueError):
    """A chat template this layout cannot express."""


def read_chat_template(folder: Path) -> tuple[str | None, str | None]:
    """-> (the template, the file it came from); (None, None) without one."""
    folder = Path(folder)
    for name in TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8"), name
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):   # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template, name
    return None, None


def _msg(role: str, *items) -> dict:
    return {"role": role, "content": [{"type": "image"} if i is None else {"type": "text", "text": i}
                                      for i in items]}


def _between(s: str, start: str, marker: str) -> tuple[str, str]:
    """s == start + X + marker + rest -> (X, rest)."""
    if not s.startswith(start) or s.count(marker) != 1:
        raise ChatTemplateError(f"the rendering {s!r} does not continue {start!r} with one {marker!r}")
    head, rest = s[len(start):].split(marker)
    return head, rest


def layout_strings(render, image_text: str | None) -> dict:
    """The layout's parts as strings, from render(messages, add_generation_prompt)."""
    a, b, c, d = _M[:4]
    u1 = render([_msg("user", a)], False)
    if u1.count(a) != 1:
        raise ChatTemplateError("a user message's text is not written once")
    pre_u, post_u = u1.split(a)
    # Two texts in one turn: what follows each text, and what closes the turn.
    head, rest = _between(render([_msg("user", a, b)], False), pre_u, a)
    suffix, tail = _between(rest, "", b)
    if head or tail != post_u or not post_u.startswith(suffix):
        raise ChatTemplateError("the texts of one turn are not written one after another")
    user_end = post_u[len(suffix):]
    generation = render([_msg("user", a)], True)
    if not generation.startswith(u1):
        raise ChatTemplateError("the generation prompt does not follow the user turn")
    assistant = generation[len(u1):]
    two = render([_msg("user", a), _msg("assistant", b)], False)
    answer, end = _between(two, u1, b)
    three = render([_msg("user", a), _msg("assistant", b), _msg("user", c)], False)
    user, rest = _between(three, two, c)
    if rest != post_u or not pre_u.endswith(user):
        raise ChatTemplateError("a later user turn is written differently from the first")
    begin = pre_u[:len(pre_u) - len(user)]
    parts = dict(begin=begin, user=user, user_end=user_end, text_suffix=suffix, assistant=assistant,
                 answer=answer, end=end, system=None, image=None, images_first=False)
    try:
        with_system = render([_msg("system", d), _msg("user", a)], False)
    except Exception:   # noqa: BLE001 - a template that refuses system messages
        with_system = None
    if with_system is not None:
        before, rest = _between(with_system, begin, d)
        after, rest = _between(rest, "", a)
        if not after.endswith(user) or rest != post_u:
            raise ChatTemplateError("a system message changes how the user turn is written")
        parts["system"] = (before, after[:len(after) - len(user)])
    if image_text is not None:
        head, rest = _between(render([_msg("user", None, a)], False), pre_u, a)
        if head == image_text and rest == post_u:
            parts["image"] = image_text
            # A text then an image: written in order, or the turn's images first.
            head, rest = _between(render([_msg("user", a, None)], False), pre_u, a)
            parts["images_first"] = head == image_text
    return parts


def render_strings(parts: dict, turns: list[tuple[list, str | None]], system: str | None,
                   generation: bool) -> str:
    """The prompt string the parts give: turns are (items, answer or None); an item is a
    text or None (an image)."""
    out = parts["begin"]
    if system is not None:
        out += parts["system"][0] + system + parts["system"][1]
    for items, answer in turns:
        out += parts["user"]
        if parts["images_first"]:
            items = [i for i in items if i is None] + [i for i in items if i is not None]
        for item in items:
            out += parts["image"] if item is None else item + parts["text_suffix"]
        out += parts["user_end"]
        if answer is not None:
            out += parts["answer"] + answer + parts["end"]
    return out + (parts["assistant"] if generation else "")


def _check_round_trip(render, parts: dict) -> None:
    a, b, c, d, e, f = _M
    conversations = [[([a], None)], [([a, b], c)], [([a], b), ([c], d), ([e], None)], [([a], b), ([c, d], e)]]
    if parts["image"] is not None:
        conversations += [[([None, a], None)], [([None, a], b), ([None, c], None)], [([a, None, b], None)],
                          [([a, None], c), ([None, None, b], None)]]
    for turns in conversations:
        for system in ([None, f] if parts["system"] else [None]):
            for generation in (False, True):
                messages = [_msg("system", system)] if system is not None else []
                for items, answer in turns:
                    messages.append(_msg("user", *items))
                    if answer is not None:
                        messages.append(_msg("assistant", answer))
                want = render(messages, generation)
                got = render_strings(parts, turns, system, generation)
                if got != want:
                    raise ChatTemplateError(f"the layout writes {got!r} where the template writes {want!r}")


def chat_layout(template: str, bos: tuple[str, int] | None, image: tuple[str, int] | None,
                special: dict | None = None) -> PromptLayout:
    """The PromptLayout of a chat template. bos: the tokenizer's BOS (name, id), written
    first as Emu3's processor does; image: the processor's placeholder (name, id), the
    template's string for an image item. special: bos_token, eos_token... as the
    tokenizer gives them to the template. Raises ChatTemplateError."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages, generation):
        return render_jinja_template([messages], chat_template=template, add_generation_prompt=generation,
                                     **(special or {}))[0][0]

    try:
        parts = layout_strings(render, image[0] if image else None)
        _check_round_trip(render, parts)
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja's own errors, raise_exception, ...
        raise ChatTemplateError(f"the chat template does not render a marker conversation: {e}") from e

    def text(s):
        return [{"text": s}] if s else []

    tokens = {}
    begin = []
    if bos is not None:
        tokens[bos[0]] = int(bos[1])
        begin.append(bos[0])
    image_parts = []
    if parts["image"] is not None:
        tokens[image[0]] = int(image[1])
        image_parts = [image[0]]
    system = [*text(parts["system"][0]), SYSTEM_SLOT, *text(parts["system"][1])] if parts["system"] else []
    layout = PromptLayout(tokens=tokens, begin=begin + text(parts["begin"]), end=text(parts["end"]),
                          user=text(parts["user"]), assistant=text(parts["assistant"]), image=image_parts, frame=[],
                          generate_image=[], placeholder=image[0] if image_parts else None, text_prefix="",
                          system=system, user_end=text(parts["user_end"]), answer=text(parts["answer"]),
                          text_suffix=parts["text_suffix"], images_first=parts["images_first"])
    layout.validate()
    return layout
