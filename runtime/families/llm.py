"""The text-only family: a decoder and its tokenizer (users' Llama / Qwen2 folders).

Prompts are plain strings, encoded by the bundle's tokenizer with its own special tokens.
"""

from __future__ import annotations


class LLM:
    banned_ids: list[int] = []   # nothing a text step cannot feed back

    def __init__(self, pipe):
        self.pipe = pipe

    def _encode(self, prompt, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError("this bundle is text-only (family llm, from export-hf --llm): prompts are strings")
        if not prompt.strip():
            raise ValueError("empty prompt")
        return self.pipe.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids

    def text_prompts(self, batch, template: str, truncate: bool, max_new_tokens: int, video_frames,
                     system: str | None = None):
        """(token rows, visual embeddings: none here)."""
        no_system(system)
        return [self._encode(prompt) for prompt in batch], None

    def chat_turn(self, items, video_frames, previous: list[int] | None, system: str | None = None):
        """A conversation turn's new ids: the previous answer's unfed end (its EOS), then
        the text (the tokenizer's start tokens on the first turn only, previous None)."""
        no_system(system)
        return (previous or []) + self._encode(items, add_special_tokens=previous is None), None

    def chat_prompt(self, turns, system: str | None = None):
        raise ValueError("this bundle is text-only (family llm) and takes one user message: its folder's chat "
                         "template is not exported")


def no_system(system: str | None) -> None:
    if system is not None:
        raise ValueError("this bundle's prompts have no system prompt (only a bundle whose prompt layout "
                         "has one, from an Emu3 folder's chat template, takes system=)")
