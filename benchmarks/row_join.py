"""What a request joining a running batch costs, three ways (the serving engine's choice).

    python -m benchmarks.row_join [--bundle DIR] [--threads 1] [--rounds 5] [--json FILE]

A batch of R busy rows (each 100 tokens into its answer) takes a new prompt of P tokens:
  in place   DecoderSession.prefill_row: a batch-1 run over the free row's part of the
             cache; the new row's first token comes out of it (what the engine does)
  copy       the prompt prefilled in a batch-1 session of its own, then its K/V rows
             copied into the free row (the copy timed on arrays of the same size)
  step in    the prompt fed one token per step beside the others: the batch runs P steps
             one row wider before the new row's first token
For each: the new row's time to first token, and the time the R running rows lose.
Medians over --rounds; one warm-up round first.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from emu_edge.runtime.bench import _median_ms as median_ms

CONTEXT = 100


def _median_ms(run, rounds: int) -> float:
    return median_ms(run, rounds)["median_ms"]


def measure(pipe, busy: int, prompt_length: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    vocab = pipe.manifest.model.vocab_size
    prompt = rng.integers(8, vocab, prompt_length).tolist()
    session = pipe.session(busy + 1)
    for b in range(busy):
        session.prefill_row(b, rng.integers(8, vocab, CONTEXT).tolist())
    session.free_row(busy)
    narrow, wide = np.full(busy, 9, np.int64), np.full(busy + 1, 9, np.int64)

    def steps(tokens, n):
        for _ in range(n):
            session.step(tokens, check=False, rows=len(tokens))
        for b in range(busy):   # back to the same context for the next round
            session.cache.lengths[b] = CONTEXT
        session.free_row(busy)

    in_place = _median_ms(lambda: session.prefill_row(busy, prompt), rounds)
    session.free_row(busy)
    alone = pipe.session(1)
    prefill = _median_ms(lambda: alone.prefill([prompt]), rounds)
    kv = pipe.manifest.model.kv
    rows = [np.zeros((kv.num_kv_heads, prompt_length, kv.head_dim), kv.dtype) for _ in range(2 * kv.num_layers)]
    target = [np.empty_like(r) for r in rows]
    copy = _median_ms(lambda: [np.copyto(t, r) for t, r in zip(target, rows)], rounds * 20)
    step_narrow = _median_ms(lambda: steps(narrow, 20), rounds) / 20
    step_wide = _median_ms(lambda: steps(wide, 20), rounds) / 20
    return {"busy_rows": busy, "prompt_tokens": prompt_length,
            "in_place": {"first_token_ms": in_place, "others_lose_ms": in_place},
            "copy": {"first_token_ms": prefill + copy, "others_lose_ms": prefill + copy, "copy_ms": copy},
            "step_in": {"first_token_ms": prompt_length * step_wide,
                        "others_lose_ms": prompt_length * (step_wide - step_narrow)},
            "step_ms": {"busy": step_narrow, "busy_plus_one": step_wide}}


def main(argv: list[str] | None = None) -> int:
    from emu_edge.runtime.pipeline import Pipeline
    from emu_edge.runtime.shipped import default_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="default: the shipped model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.bundle or default_bundle(log=lambda *a: print(*a, file=sys.stderr)),
                         threads=args.threads)
    results = [measure(pipe, busy, length, args.rounds) for busy in (1, 4, 8, 15) for length in (16, 67)]
    print("| busy rows | prompt | in place: first token / others lose | copy | step in |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [f"{r[k]['first_token_ms']:.2f} / {r[k]['others_lose_ms']:.2f} ms" for k in ("in_place", "copy", "step_in")]
        print(f"| {r['busy_rows']} | {r['prompt_tokens']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
