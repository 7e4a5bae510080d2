"""Make the shipped copy of a trained checkpoint: weights only, fp16, judge included.

    python -m emu_edge.training.ship runs/small models/emu-edge-small

No step folders, metrics or plots: those stay with the run. The eval then runs on exactly
what ships (fp16 weights, loaded back as fp32).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from emu_edge.training.checkpoint import load_checkpoint, save_checkpoint


def ship(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, generation: dict | None = None) -> Path:
    """generation: defaults to record in emu.json (e.g. a guidance scale chosen on val)."""
    src, dst = Path(src), Path(dst)
    model, tokenizer, cfg = load_checkpoint(src)
    save_checkpoint(model, tokenizer, cfg, dst, dtype=dtype, generation=generation)
    shutil.copyfile(src / "judge.onnx", dst / "judge.onnx")
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"shipped {src} -> {dst} ({size / 1e6:.1f} MB, {dtype})")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--guidance", type=float, help="default guidance scale to record (choose it on val)")
    parser.add_argument("--steps", type=int, help="default denoising steps to record")
    args = parser.parse_args()
    generation = {k: v for k, v in (("guidance", args.guidance), ("steps", args.steps)) if v is not None}
    ship(args.src, args.dst, generation=generation)


if __name__ == "__main__":
    main()
