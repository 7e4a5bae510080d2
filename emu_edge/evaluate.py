"""`emu-edge eval`: a checkpoint or bundle on the held-out split, as a JSON of metrics.

- an emu2 checkpoint (emu.json, llm/, ...): scored in PyTorch (training.evaluate);
- an Emu3 folder (`--family emu3`, config.json: a finished decoder stage or a shipped
  model): exported with `emu-edge export-hf`, then its bundle scored through the
  torch-free runtime (calibration.evaluate), so the figures are what users run;
- a run holding only stage 0's vq/ (`--family emu3`): the VQ-VAE's reconstructions;
- an emu3 bundle (a folder with manifest.json, quantized ones too) with `--judge`.

This verb composes training, export and calibration, which may not import each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from emu_edge.cli import main as cli_main

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (emu.json, llm/, vision/, unet/, ...; emu3: config.json "
                                           "or vq/), or an emu3 bundle (manifest.json) with --judge")
    parser.add_argument("--family", choices=("emu2", "emu3"), default="emu2",
                        help="the checkpoint's family; emu3: an Emu3ForConditionalGeneration folder (every task, "
                             "through its exported bundle), or a run holding only stage 0's vq/ (reconstructions)")
    parser.add_argument("--judge", help="a bundle's judge: the judge.onnx of the run or shipped folder it came from")
    parser.add_argument("--json", help="write the metrics to this file")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default test-set sizes")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test (report) or val (tune generation settings on it, not on test)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the checkpoint's)")
    parser.add_argument("--only", metavar="TASK,...",
                        help="score only these tasks (an unknown one is refused with the list); with --split val "
                             "and --scale, the larger samples the model was chosen on")


def run(args: argparse.Namespace) -> int:
    folder = Path(args.checkpoint)
    bundle = (folder / "manifest.json").is_file()
    if bool(args.judge) != bundle:
        raise SystemExit("emu-edge eval: --judge goes with a bundle (a folder with manifest.json), and a bundle "
                         "needs one: the judge.onnx of the folder it was exported from")
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    only = args.only.split(",") if args.only else None
    try:
        if bundle or args.family == "emu3":
            metrics = _emu3(folder, args, only, log, bundle)
        else:
            from emu_edge.training.evaluate import evaluate

            metrics = evaluate(folder, scale=args.scale, log=log, steps=args.steps, guidance=args.guidance,
                               split=args.split, only=only)
    # The checkpoint's errors (training.checkpoint.CheckpointError) are RuntimeErrors: caught
    # as such, so that scoring a bundle never imports training (torch).
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"emu-edge eval: {e}")
    text = json.dumps(metrics, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    print(text, end="")
    return 0


def _emu3(folder: Path, args, only, log, bundle: bool) -> dict:
    """A folder with a decoder (config.json) or a bundle is scored on every task; a run with
    only stage 0's vq/, on the VQ-VAE's reconstructions."""
    decoder = bundle or (folder / "config.json").is_file()
    given = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance), ("--only", args.only))
             if value is not None and (decoder is False or flag == "--steps")]
    if given:
        raise ValueError(f"{', '.join(given)}: not for this folder; emu3 images have no denoising steps, and a "
                         "VQ-VAE alone is scored on its reconstructions only")
    if not decoder:
        from emu_edge.training.evaluate_vq import evaluate_vq

        return evaluate_vq(folder, split=args.split, scale=args.scale, log=log)
    return evaluate_emu3(folder, split=args.split, scale=args.scale, guidance=args.guidance, only=only, log=log,
                         judge=args.judge)


def evaluate_emu3(folder: str | Path, split: str = "test", scale: float = 1.0, guidance: float | None = None,
                  only: list[str] | None = None, log=print, judge: str | Path | None = None) -> dict:
    """An Emu3 folder (exported to a temporary bundle first) or an emu3 bundle, scored."""
    from emu_edge.calibration.evaluate import check_tasks, evaluate_bundle

    check_tasks(only)   # before the export, which takes a while
    folder = Path(folder)
    kw = dict(split=split, scale=scale, guidance=guidance, only=only, log=log)
    if judge is not None:
        return evaluate_bundle(folder, judge, **kw)
    for name in ("config.json", "judge.onnx"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint file missing: {folder / name}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        with contextlib.redirect_stdout(sys.stderr):
            if cli_main(["export-hf", str(folder), "--out", str(out)]) != 0:
                raise RuntimeError(f"emu-edge export-hf {folder} failed (above); the eval scores the exported "
                                   "bundle")
        return evaluate_bundle(out, folder / "judge.onnx", **kw)
