"""What an 8B Emu3 needs in memory per image size: the weights at each precision and the
KV cache at float16, from transformers' own Emu3Config defaults (the published 8B's
shapes; nothing is downloaded) and the KV formula the runtime checks before it allocates.

    python -m benchmarks.emu3_memory [--json FILE]

The KV cache (the runtime's KVSpec.bytes_for) of one decoder row holds 2 (key, value) x
layers x kv_heads x head_dim values per position, for the prompt and every image token fed back: an h x w-code image is
h * (w + 1) + 1 tokens (a row end per row, then the image end). Guidance adds a second row
per image (the negative prompt), as Emu3's own generation runs a second forward for it.
Weight bytes are the bundle's: fp16 everywhere; int8/int4 as `emu-edge quantize` writes
them (MatMulNBits, block 32, one float32 scale per block; the output head at 8 bits under
int4; the token table float32 under int8 and, under int4, 4-bit GatherBlockQuantized with a
float32 scale and a 4-bit zero point per block). The VQ decoder and activations come on
top; `emu-edge bench` on a bundle measures the whole process (peak RSS per image size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPT_TOKENS = 64        # a prompt with Emu3's image header, generously
BLOCK = 32                # MatMulNBits block size (emu-edge quantize's default)
SCALE_BYTES = 4           # one float32 scale per block
SIZES = (256, 512, 720)   # 720: Emu3's default image_area (720 x 720)


def shapes() -> dict:
    from transformers import Emu3Config

    t = Emu3Config().text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    table = t.vocab_size * t.hidden_size
    layer = (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * head_dim   # q, k, v
             + t.num_attention_heads * head_dim * t.hidden_size                              # o
             + 3 * t.hidden_size * t.intermediate_size)                                     # gate, up, down
    return {"layers": t.num_hidden_layers, "kv_heads": t.num_key_value_heads, "head_dim": head_dim,
            "vocab": t.vocab_size, "hidden": t.hidden_size, "table": table, "lm_head": table,
            "blocks": layer * t.num_hidden_layers, "max_positions": t.max_position_embeddings}


def weight_bytes(s: dict, precision: str) -> int:
    def nbits(bits: int, n: int) -> float:
        return n * (bits / 8 + SCALE_BYTES / BLOCK)

    if precision == "fp16":
        return 2 * (s["table"] + s["lm_head"] + s["blocks"])
    if precision == "int8":
        return int(4 * s["table"] + nbits(8, s["lm_head"] + s["blocks"]))
    if precision == "int4":
        table = s["table"] * (4 / 8 + (SCALE_BYTES + 4 / 8) / BLOCK)   # codes, scale, zero point
        return int(table + nbits(8, s["lm_head"]) + nbits(4, s["blocks"]))
    raise ValueError(precision)


def kv_spec(s: dict):
    """The runtime's own KV layout (the one KVCache checks and allocates), at float16."""
    from emu_edge.runtime.manifest import KVSpec

    return KVSpec(s["layers"], s["kv_heads"], s["head_dim"], dtype="float16")


def table(factor: int = 8) -> dict:
    s = shapes()
    kv_layout = kv_spec(s)
    per_position = kv_layout.bytes_for(1, 1)
    rows = []
    for side in SIZES:
        codes = side // factor
        tokens = codes * (codes + 1) + 1
        positions = PROMPT_TOKENS + tokens
        fits = positions <= s["max_positions"]
        kv = {g: kv_layout.bytes_for(2 if g else 1, positions) for g in (False, True)}
        rows.append({"image": f"{side}x{side}", "codes": f"{codes}x{codes}", "tokens": tokens,
                     "fits_context": fits, "kv_bytes_one_row": kv[False], "kv_bytes_guided": kv[True],
                     "total_bytes_guided": {p: weight_bytes(s, p) + kv[True] for p in ("fp16", "int8", "int4")}})
    return {"shapes": s, "kv_bytes_per_position": per_position,
            "weight_bytes": {p: weight_bytes(s, p) for p in ("fp16", "int8", "int4")}, "rows": rows}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    t = table()
    s = t["shapes"]
    print(f"Emu3-8B (transformers' Emu3Config defaults): {s['layers']} layers, {s['kv_heads']} kv heads x "
          f"{s['head_dim']}, vocab {s['vocab']}; KV {t['kv_bytes_per_position'] / 1024:.0f} KiB per position "
          f"and row at float16")
    print("weights: " + ", ".join(f"{p} {_gb(b)}" for p, b in t["weight_bytes"].items()))
    print("\n| image | tokens | KV, one row | KV with guidance | fp16 + KV | int8 + KV | int4 + KV |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in t["rows"]:
        totals = " | ".join(_gb(r["total_bytes_guided"][p]) for p in ("fp16", "int8", "int4"))
        note = "" if r["fits_context"] else " (beyond the context)"
        print(f"| {r['image']}{note} | {r['tokens']:,} | {_gb(r['kv_bytes_one_row'])} | "
              f"{_gb(r['kv_bytes_guided'])} | {totals} |")
    if args.json:
        args.json.write_text(json.dumps(t, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
