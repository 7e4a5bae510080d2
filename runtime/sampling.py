"""Next-token selection in numpy: repetition penalty, greedy or seeded sampling, stop strings.

The order and semantics follow transformers' logits processors, so a bundle sampled here
and the PyTorch model sampled with `generate` see the same distribution:

    repetition penalty -> allowed-token mask -> (greedy argmax) | temperature -> top-k -> top-p
    -> softmax -> draw

The allowed-token mask plays transformers' PrefixConstrainedLogitsProcessor (Emu3's image
rows: only visual ids inside a row), which runs after the penalty and before the warpers.

Each step is a plain function over a [B, V] array so it can be checked on its own; the
`Sampler` strings them together and owns the random generator.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingConfig:
    """How to pick the next token. The defaults are greedy decoding.

    `top_k=0` and `top_p=1.0` switch those filters off; `repetition_penalty=1.0` is no
    penalty. `seed=None` draws fresh entropy from the OS; an int makes sampling repeatable.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingConfig:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_real(self.temperature) or not (0 < self.temperature < math.inf):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature!r} "
                "(for greedy decoding set do_sample=False instead of temperature=0)"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or not (0 < self.repetition_penalty < math.inf):
            raise ValueError(
                "repetition_penalty must be a finite number > 0 (1 disables it, > 1 discourages "
                f"repeats), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        return self


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def apply_repetition_penalty(
    logits: np.ndarray, history: list[list[int]], penalty: float
) -> np.ndarray:
    """Penalise every token id seen in `history[b]`, once per id however often it occurs.

    Positive logits are divided by the penalty and negative ones multiplied, so a penalty
    above 1 always makes a seen token less likely. logits: [B, V] -> [B, V] (a new array).
    """
    batch, vocab = logits.shape
    _check_history(history, batch)
    if penalty == 1.0:
        return logits.copy()
    lengths = [len(row) for row in history]
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.fromiter((t for row in history for t in row), dtype=np.int64, count=sum(lengths))
    if cols.size and (cols.min() < 0 or cols.max() >= vocab):
        raise ValueError(
            f"history holds token ids outside the vocabulary [0, {vocab}): "
            f"min {cols.min()}, max {cols.max()}; check the tokenizer matches the model"
        )
    seen = np.zeros((batch, vocab), dtype=bool)
    seen[rows, cols] = True
    penalised = np.where(logits < 0, logits * penalty, logits / penalty).astype(logits.dtype)
    return np.where(seen, penalised, logits)


def _check_history(history: list[list[int]], batch: int) -> None:
    if len(history) != batch:
        raise ValueError(f"history has {len(history)} rows but logits have batch size {batch}")


def apply_allowed(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Only the allowed ids stay: the others become -inf. allowed: a bool mask [V] (the same
    for every row) or [B, V]; a row must allow at least one id."""
    allowed = np.asarray(allowed)
    if allowed.dtype != bool or allowed.shape[-1] != logits.shape[-1] or allowed.ndim not in (1, 2):
        raise ValueError(f"allowed must be a bool mask [vocab] or [batch, vocab] over {logits.shape[-1]} ids, "
                         f"got {allowed.dtype} {allowed.shape}")
    if not np.all(allowed.any(axis=-1)):
        raise ValueError("allowed forbids every id of a row: nothing could be sampled")
    return np.where(allowed, logits, -np.inf).astype(logits.dtype)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return (logits / np.asarray(temperature, dtype=logits.dtype)).astype(logits.dtype)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the `top_k` largest logits per row (ties with the k-th are kept too); 0 keeps all."""
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logits.copy()
    # partition puts the k-th largest at index V-k without sorting the whole row
    kth_largest = np.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k, None]
    return np.where(logits < kth_largest, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the most probable tokens whose probabilities reach `top_p`.

    As in transformers, a token is dropped when the cumulative probability of it and every
    less likely token is <= 1 - top_p; the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits.copy()
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_logits), axis=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[:, -1] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits).astype(logits.dtype)


def _softmax(logits: np.ndarray) -> np.ndarray:
    # float64 so the cumulative sums that top-p and the draw depend on do not drift
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


class Sampler:
    """Picks one token per row of a [B, V] logits array.

    The random generator is seeded once here, so one `Sampler` with a fixed seed gives the
    same tokens for the same sequence of calls. groups: [(seed, rows), ...] in row order,
    a generator of its own for each group of rows (the rows of several requests batched
    together, each drawing what it draws alone); None: one generator, config.seed, for all.
    """

    def __init__(self, config: SamplingConfig | None = None, groups: list[tuple[int | None, int]] | None = None):
        self.config = (config or SamplingConfig()).validate()
        self.rng = np.random.default_rng(self.config.seed)
        self.groups = None if groups is None else [(np.random.default_rng(seed), rows) for seed, rows in groups]

    def __call__(self, logits: np.ndarray, history: list[list[int]],
                 allowed: np.ndarray | None = None, generators: list | None = None) -> np.ndarray:
        """allowed: an optional bool mask ([V] or [B, V]); ids outside it are never picked.
        generators: one numpy Generator per row, drawn from instead of the sampler's own
        (rows that join and leave a batch, each keeping its own stream)."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] == 0:
            raise ValueError(f"logits must have shape [batch, vocab], got {logits.shape}")
        # max() propagates NaN: one reduction instead of an isnan mask and its any().
        if np.isnan(logits.max()):
            raise ValueError("logits contain NaN; the model output is broken upstream of sampling")
        config = self.config
        if config.repetition_penalty == 1.0:
            _check_history(history, logits.shape[0])
            scores = logits   # nothing to rescale; the steps below never write into it
        else:
            scores = apply_repetition_penalty(logits, history, config.repetition_penalty)
        if allowed is not None:
            scores = apply_allowed(scores, allowed)
        if not config.do_sample:
            return scores.argmax(axis=-1).astype(np.int64)
        scores = apply_temperature(scores, config.temperature)
        scores = apply_top_k(scores, config.top_k)
        scores = apply_top_p(scores, config.top_p)
        return self._draw(_softmax(scores), generators)

    def _draw(self, probs: np.ndarray, generators: list | None = None) -> np.ndarray:
        # inverse-CDF draw, one uniform per row: the first token whose cumulative
        # probability exceeds u; zero-probability tokens can never be that first one
        cumulative = np.cumsum(probs, axis=-1)
        if generators is not None:
            if len(generators) != probs.shape[0]:
                raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
            u = np.concatenate([rng.random(1) for rng in generators])
        elif self.groups is None:
            u = self.rng.random(probs.shape[0])
        else:
            u = np.concatenate([rng.random(rows) for rng, rows in self.groups])
            if len(u) != probs.shape[0]:
                raise ValueError(f"the sampler's groups hold {len(u)} rows, the logits {probs.shape[0]}")
        u = u[:, None] * cumulative[:, -1:]
        picked = (cumulative <= u).sum(axis=-1)
        return np.minimum(picked, probs.shape[1] - 1).astype(np.int64)


def seed_groups(seed, rows: int) -> list[tuple[int, int]]:
    """A seed (one generator for every row) or [(seed, rows), ...] in row order (the
    requests of a batch, each with its own) -> the checked groups."""
    groups = seed if isinstance(seed, list) else [(seed, rows)]
    for value, count in groups:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"seed must be an integer >= 0, got {value!r}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"a seed group covers >= 1 rows, got {count!r}")
    if sum(count for _, count in groups) != rows:
        raise ValueError(f"the seed groups cover {sum(c for _, c in groups)} rows, the batch has {rows}")
    return [(int(value), count) for value, count in groups]


class StopChecker:
    """Finds stop strings in decoded text, wherever the token boundaries fall.

    Callers re-decode the generated tokens and pass the whole text each step: a stop string
    split over several tokens is only visible in the joined text.
    """

    def __init__(self, stop_strings: list[str]):
        if isinstance(stop_strings, str):
            raise ValueError(
                f"stop_strings must be a list of strings, got the string {stop_strings!r}; "
                f"wrap it in a list: [{stop_strings!r}]"
            )
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every stop string must be a non-empty string, got {s!r}")
        self.stop_strings = list(stop_strings)

    def check(self, text: str) -> int | None:
        """Position where the earliest stop string starts (cut the text there), or None."""
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def safe_length(self, text: str) -> int:
        """How much of `text` can be streamed out now without showing part of a stop string.

        Returns the cut position if a stop string is present; otherwise holds back the
        longest tail of `text` that is a prefix of some stop string, which later tokens
        might complete.
        """
        cut = self.check(text)
        if cut is not None:
            return cut
        held = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return len(text) - held
