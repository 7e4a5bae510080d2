"""The text core: the verbs of a text loop, and the one loop that every text verb runs.

As gpt-fast's generate.py: `prefill` (fill the cache from the prompts), `decode_step`
(one token per row), `sample` (never a banned id), and `loop`, which samples, yields,
stops a row at its stop id and feeds the rest back. `Pipeline.generate_ids`,
`generate_text(_batch)`, `stream_text` and `Conversation` all run `loop`; a family adds
only how its prompts become rows (and, for images, loops of its own).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from emu_edge.runtime.decoder import ContextTooLongError, DecoderOutput, DecoderSession
from emu_edge.runtime.sampling import Sampler, StopChecker


def check_room(prompt_length: int, max_new_tokens: int, max_length: int, hint: str = "") -> None:
    """A prompt plus its answer must fit the cache; refused before any step runs."""
    # The last new token is never fed back, hence the - 1.
    needed = prompt_length + max_new_tokens - 1
    if needed > max_length:
        raise ContextTooLongError(
            f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) needs {needed} positions, "
            f"beyond max_length {max_length}; shorten the prompt or lower max_new_tokens{hint}")


def prefill(session: DecoderSession, rows: list[list[int]], visual: np.ndarray | None = None) -> DecoderOutput:
    """Fill the cache with one prompt per row; the logits of each row's last token."""
    return session.prefill(rows, visual)


def decode_step(session: DecoderSession, tokens: np.ndarray) -> DecoderOutput:
    """Feed one sampled token per row. No placeholder check: `sample` never picks one."""
    return session.step(tokens, check=False)


def sample(sampler: Sampler, logits: np.ndarray, histories: list[list[int]], banned: list[int],
           allowed: np.ndarray | None = None, generators: list | None = None) -> np.ndarray:
    """The next token of every row. Banned ids (a visual placeholder, which a text step
    cannot supply an embedding for) are never sampled; with `allowed` (a bool mask), only
    the ids it allows are (Emu3's image rows). generators: one per row (Sampler)."""
    for token in banned:
        logits[:, token] = -np.inf  # one id at a time: a fancy-indexed write costs 4x as much
    return sampler(logits, histories, allowed, generators)


def loop(session: DecoderSession, out: DecoderOutput, histories: list[list[int]], max_new_tokens: int,
         sampler: Sampler, stop_ids, banned: list[int]) -> Iterator[list[int | None]]:
    """The text loop from a filled cache (`out`: its last logits). At each step, the new token
    of every row (None once a row has stopped; a row's stop token is yielded, then it
    stops). Sampled tokens are appended to `histories` (the repetition penalty reads them);
    the last one yielded is never fed back."""
    done = [False] * len(histories)
    stop = set(stop_ids)
    for step in range(max_new_tokens):
        tokens = sample(sampler, out.logits, histories, banned)
        new = tokens.tolist()
        yield [None if done[b] else t for b, t in enumerate(new)]
        for b, token in enumerate(new):
            if not done[b]:
                histories[b].append(token)
                done[b] = token in stop
        if all(done) or step == max_new_tokens - 1:
            return
        out = decode_step(session, tokens)


def collect(steps: Iterator[list[int | None]], rows: int) -> list[list[int]]:
    """New tokens per row from `loop`, each row ending at (and including) its stop id."""
    new: list[list[int]] = [[] for _ in range(rows)]
    for tokens in steps:
        for b, token in enumerate(tokens):
            if token is not None:
                new[b].append(token)
    return new


class PieceDecoder:
    """The text of one row's tokens as it grows: `push(token)` returns the new text that is
    safe to show (text that may be the start of a stop string is held back until it is
    known not to be, and a partial UTF-8 sequence until its rest arrives); `stopped` is set
    at EOS or a stop string; `finish()` returns the rest."""

    def __init__(self, decode: Callable[[list[int]], str], eos: set[int], stop: list[str] | None):
        self.decode, self.eos = decode, eos
        self.checker = StopChecker(stop) if stop else None
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if token in self.eos:
            self.stopped = True
            return ""
        self.ids.append(token)
        self.text = self.decode(self.ids).lstrip()
        if self.checker is not None:
            cut = self.checker.check(self.text)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return ""
            safe = self.checker.safe_length(self.text)
        else:
            safe = len(self.text)
        # A partial UTF-8 sequence decodes to U+FFFD; wait for the rest.
        if safe > self.shown and "\ufffd" not in self.text[self.shown:safe]:
            piece, self.shown = self.text[self.shown:safe], safe
            return piece
        return ""

    def finish(self) -> str:
        rest = self.text.rstrip()
        piece = rest[self.shown:]
        self.shown = max(self.shown, len(rest))
        return piece


def stream_pieces(tokens: Iterator[int], decode: Callable[[list[int]], str], eos: set[int],
                  stop: list[str] | None) -> Iterator[str]:
    """Decoded text increments for a stream of token ids (a PieceDecoder's pieces)."""
    row = PieceDecoder(decode, eos, stop)
    for token in tokens:
        piece = row.push(token)
        if piece:
            yield piece
        if row.stopped:
            break
    rest = row.finish()
    if rest:
        yield rest
