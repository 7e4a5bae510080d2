"""numpy sampling against transformers' logits processors, plus the sampler's own contract."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from emu_edge.runtime.sampling import (
    Sampler,
    SamplingConfig,
    StopChecker,
    apply_allowed,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)

BATCH, VOCAB = 4, 257


def random_logits(seed: int, batch: int = BATCH, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * 3).astype(np.float32)


def random_history(seed: int, batch: int = BATCH, vocab: int = VOCAB) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # rows of equal length because transformers takes a rectangular input_ids tensor
    return rng.integers(0, vocab, size=(batch, 30)).tolist()


def assert_same_scores(ours: np.ndarray, theirs: torch.Tensor) -> None:
    theirs = theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits, history = random_logits(1), random_history(2)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    theirs = processor(torch.tensor(history), torch.from_numpy(logits.copy()))
    ours = apply_repetition_penalty(logits, history, penalty)
    assert not np.array_equal(ours, logits)
    assert_same_scores(ours, theirs)


def test_repetition_penalty_ragged_history_and_once_per_token():
    logits = random_logits(3, batch=2, vocab=10)
    logits[0, 4], logits[1, 7] = 2.0, -2.0
    out = apply_repetition_penalty(logits, [[4, 4, 4], []], 2.0)
    assert out[0, 4] == pytest.approx(1.0)  # divided once, not three times
    np.testing.assert_array_equal(out[1], logits[1])
    out = apply_repetition_penalty(logits, [[], [7]], 2.0)
    assert out[1, 7] == pytest.approx(-4.0)


def test_repetition_penalty_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_repetition_penalty(random_logits(4, batch=1, vocab=10), [[3, 10]], 1.2)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(temperature):
    logits = random_logits(5)
    theirs = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits.copy()))
    assert_same_scores(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(top_k):
    logits = random_logits(6)
    theirs = TopKLogitsWarper(top_k)(None, torch.from_numpy(logits.copy()))
    ours = apply_top_k(logits, top_k)
    assert (np.isfinite(ours).sum(axis=-1) == min(top_k, VOCAB)).all()
    assert_same_scores(ours, theirs)


def test_top_k_keeps_ties_like_transformers():
    logits = np.array([[1.0, 3.0, 3.0, 0.5, 3.0]], dtype=np.float32)
    theirs = TopKLogitsWarper(2)(None, torch.from_numpy(logits.copy()))
    assert_same_scores(apply_top_k(logits, 2), theirs)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(top_p):
    logits = random_logits(7)
    theirs = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits.copy()))
    assert_same_scores(apply_top_p(logits, top_p), theirs)


def test_top_p_after_top_k_matches_transformers():
    # the chain the sampler runs: -inf entries from top-k flow into top-p
    logits = random_logits(8)
    scores = torch.from_numpy(logits.copy())
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.7)):
        scores = warper(None, scores)
    ours = apply_top_p(apply_top_k(apply_temperature(logits, 0.8), 20), 0.7)
    assert_same_scores(ours, scores)


def test_top_p_keeps_at_least_one_token():
    # with top_p this small, 1 - top_p rounds to 1.0, so without the keep-one rule even
    # the top token (cumulative probability exactly 1.0 in the first row) would be dropped
    logits = np.array([[3.0, -np.inf, -np.inf, -np.inf], [10.0, 0.0, -1.0, -2.0]], dtype=np.float32)
    out = apply_top_p(logits, 1e-20)
    assert (np.isfinite(out).sum(axis=-1) == 1).all()
    assert np.isfinite(out[:, 0]).all()
    assert_same_scores(out, TopPLogitsWarper(1e-20)(None, torch.from_numpy(logits.copy())))


def test_greedy_is_argmax_after_penalty():
    logits = random_logits(9, batch=3)
    assert (Sampler()(logits, [[]] * 3) == logits.argmax(-1)).all()
    top = logits.argmax(-1)
    # make the penalty strong enough that no penalised positive logit can stay on top
    history = [[int(t)] for t in top]
    picked = Sampler(SamplingConfig(repetition_penalty=1e6))(logits, history)
    assert picked.dtype == np.int64 and picked.shape == (3,)
    assert (picked != top).all()


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = random_logits(10, batch=8)
    history = [[]] * 8

    def run(seed):
        sampler = Sampler(SamplingConfig(do_sample=True, temperature=1.5, seed=seed))
        return np.stack([sampler(logits, history) for _ in range(20)])

    first = run(123)
    np.testing.assert_array_equal(first, run(123))
    assert not np.array_equal(first, run(124))


def test_sampling_respects_filters():
    logits = random_logits(11, batch=2)
    sampler = Sampler(SamplingConfig(do_sample=True, top_k=3, seed=0))
    allowed = np.argsort(logits, axis=-1)[:, -3:]
    for _ in range(50):
        picked = sampler(logits, [[], []])
        assert all(picked[b] in allowed[b] for b in range(2))


def test_sampled_frequencies_match_softmax():
    # Pearson chi-square with a fixed seed: deterministic, and the threshold is far above
    # the 99.9th percentile (~24.3 at 6 degrees of freedom) so a correct sampler passes
    # while a wrong distribution (e.g. temperature ignored) fails by orders of magnitude.
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5]], dtype=np.float32)
    temperature, draws = 0.9, 20_000
    sampler = Sampler(SamplingConfig(do_sample=True, temperature=temperature, seed=7))
    batch = np.repeat(logits, 200, axis=0)
    picked = np.concatenate([sampler(batch, [[]] * 200) for _ in range(draws // 200)])
    counts = np.bincount(picked, minlength=logits.shape[1])
    expected = torch.softmax(torch.from_numpy(logits[0]) / temperature, -1).double().numpy() * draws
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 30, (counts, expected)
    wrong = torch.softmax(torch.from_numpy(logits[0]), -1).double().numpy() * draws
    assert ((counts - wrong) ** 2 / wrong).sum() > 30


def test_sampler_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        Sampler()(np.zeros(5, dtype=np.float32), [[]])
    with pytest.raises(ValueError, match="history has 1 rows"):
        Sampler()(random_logits(12, batch=2), [[]])
    bad = random_logits(13, batch=1)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Sampler()(bad, [[]])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"do_sample": "yes"}, "do_sample"),
    ],
)
def test_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=name):
        Sampler(SamplingConfig(**kwargs))


def test_valid_config_passes():
    config = SamplingConfig(
        do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=0
    )
    assert config.validate() is config


def test_stop_checker_across_token_boundaries():
    checker = StopChecker(["</s>", "\nUser:"])
    text = ""
    cuts = []
    for piece in ["Hello", " there", "\nUs", "er", ": hi"]:
        text += piece
        cuts.append(checker.check(text))
    assert cuts == [None, None, None, None, len("Hello there")]
    assert text[: cuts[-1]] == "Hello there"


def test_stop_checker_earliest_string_wins():
    checker = StopChecker(["world", "lo w"])
    assert checker.check("hello world") == 3
    assert checker.check("nothing here") is None


def test_stop_checker_safe_length_holds_back_partial_stop():
    checker = StopChecker(["\nUser:"])
    assert checker.safe_length("abc") == 3
    assert checker.safe_length("abc\nUs") == 3
    assert checker.safe_length("abc\nUx") == 6
    assert checker.safe_length("abc\nUser: more") == 3


@pytest.mark.parametrize("bad", [[""], ["ok", ""], [None], "stop"])
def test_stop_checker_validation(bad):
    with pytest.raises(ValueError, match="stop"):
        StopChecker(bad)


def test_allowed_mask_matches_transformers_prefix_constraint():
    """A row-wise allowed set, as transformers' PrefixConstrainedLogitsProcessor applies it."""
    logits = random_logits(20)
    allowed_ids = [list(range(10, 40)), [5], list(range(0, VOCAB, 3)), [VOCAB - 1, 7]]
    mask = np.zeros((BATCH, VOCAB), bool)
    for b, ids in enumerate(allowed_ids):
        mask[b, ids] = True
    processor = PrefixConstrainedLogitsProcessor(lambda b, ids: allowed_ids[b], num_beams=1)
    theirs = processor(torch.zeros((BATCH, 3), dtype=torch.long), torch.from_numpy(logits.copy()))
    assert_same_scores(apply_allowed(logits, mask), theirs)


def test_sampler_never_picks_outside_the_allowed_mask():
    mask = np.zeros(VOCAB, bool)
    mask[100:120] = True
    logits = random_logits(21)
    logits[:, 0] = 100.0   # the best id overall is not allowed
    greedy = Sampler()(logits, [[]] * BATCH, allowed=mask)
    np.testing.assert_array_equal(greedy, logits[:, 100:120].argmax(-1) + 100)
    drawn = Sampler(SamplingConfig(do_sample=True, top_k=5, seed=3))
    for _ in range(20):
        picked = drawn(logits, [[]] * BATCH, allowed=mask)
        assert np.all((picked >= 100) & (picked < 120))
    with pytest.raises(ValueError, match="forbids every id"):
        Sampler()(logits, [[]] * BATCH, allowed=np.zeros(VOCAB, bool))
    with pytest.raises(ValueError, match="bool mask"):
        Sampler()(logits, [[]] * BATCH, allowed=np.ones(VOCAB - 1, bool))
