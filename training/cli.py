"""`emu-edge train`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("emu2", "emu3"), default="emu2",
                        help="emu2 (continuous visual embeddings, U-Net) or emu3 (VQ codes: stage 0 the VQ-VAE, "
                             "stage 1 the decoder)")
    parser.add_argument("--preset", default="small", help="tiny (tests) or small (the shipped default)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (and to resume from)")
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default: the preset's)")
    parser.add_argument("--stages", help="comma-separated stages to run, in order (default: all of the family's: "
                                         "emu2 0,1,2,3,4,5; emu3 0,1)")
    parser.add_argument("--lr", type=float, help="peak learning rate of every stage run (default: the preset's, per stage)")
    parser.add_argument("--mix", metavar="TASK=W,...",
                        help="task weights replacing the stage's own mixture, e.g. vqa=0.6,chat=0.4 (one stage only; "
                             "tasks: see emu_edge.data.TASKS)")
    parser.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    parser.add_argument("--seed", type=int,
                        help="seed of the data stream and fresh weights (default: the preset's); give a continuation "
                             "(--init-from) a new one so it sees new samples, not the ones its source trained on")
    parser.add_argument("--resume", action="store_true", help="continue from the folder's last complete step")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in --out and start over (without --resume or this, a folder "
                             "holding a run is refused)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start from a finished checkpoint's weights (e.g. the shipped model) instead of fresh ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_mix(text: str) -> dict[str, float]:
    """"vqa=0.6,chat=0.4" -> {"vqa": 0.6, "chat": 0.4}, tasks and weights checked."""
    from emu_edge.data import check_tasks

    mix = {}
    for part in text.split(","):
        task, sep, weight = part.partition("=")
        try:
            mix[task.strip()] = float(weight) if sep else float("nan")
        except ValueError:
            raise ValueError(f"weight of {task.strip()!r} is not a number: {weight!r}") from None
        if not mix[task.strip()] >= 0:
            raise ValueError(f"each entry is TASK=WEIGHT with a weight >= 0; got {part!r}")
    check_tasks(mix)
    if not sum(mix.values()) > 0:
        raise ValueError("the weights must have a positive sum")
    return mix


def run(args: argparse.Namespace) -> int:
    from emu_edge.training.checkpoint import CheckpointError
    from emu_edge.training.config import get_preset
    from emu_edge.training.train import STAGES, train

    if args.family == "emu3":
        return run_emu3(args)
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise SystemExit(f"emu-edge train: {e}")
    stages = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise SystemExit(f"emu-edge train: unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    if stages != sorted(stages, key=int):
        raise SystemExit("emu-edge train: --stages must be in increasing order")
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("emu-edge train: --steps must be >= 1")
        cfg.steps = {s: args.steps for s in cfg.steps}
    if args.lr is not None:
        if not args.lr > 0:
            raise SystemExit("emu-edge train: --lr must be > 0")
        cfg.lr = {s: args.lr for s in cfg.lr}
    if args.mix is not None:
        if len(stages) != 1:
            raise SystemExit(f"emu-edge train: --mix replaces one stage's mixture; --stages names {len(stages)}")
        try:
            cfg.mixes = {stages[0]: parse_mix(args.mix)}
        except ValueError as e:
            raise SystemExit(f"emu-edge train: --mix: {e}")
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.seed is not None:
        cfg.seed = args.seed
    try:
        out = train(cfg, args.out, stages, resume=args.resume, progress=not args.no_progress,
                    init_from=args.init_from, overwrite=args.overwrite)
    except CheckpointError as e:
        raise SystemExit(f"emu-edge train: {e}")
    print(f"checkpoint written to {out}")
    return 0


def run_emu3(args: argparse.Namespace) -> int:
    """emu3's stages: 0, the VQ-VAE; 1, the decoder over its codes (in the same --out)."""
    import json

    from emu_edge.training import checkpoint as ckpt
    from emu_edge.training.config import get_emu3_preset, get_vq_preset
    from emu_edge.training.train_emu3 import train_decoder
    from emu_edge.training.train_vq import train_vq

    stages = [s.strip() for s in (args.stages or "0,1").split(",") if s.strip()]
    if not stages or stages != sorted(set(stages)) or not set(stages) <= {"0", "1"}:
        raise SystemExit(f"emu-edge train: emu3's stages are 0 (the VQ-VAE) and 1 (the decoder), in order; got "
                         f"--stages {args.stages}")
    if args.mix is not None:
        raise SystemExit("emu-edge train: --mix is for the emu2 stages; emu3's stages train on their preset's tasks")
    if args.init_from is not None and stages != ["1"]:
        raise SystemExit("emu-edge train: emu3's --init-from starts the decoder stage (--stages 1) from a finished "
                         "folder, whose VQ-VAE it keeps")
    try:
        configs = {"0": get_vq_preset(args.preset), "1": get_emu3_preset(args.preset)}
    except ValueError as e:
        raise SystemExit(f"emu-edge train: {e}")
    for cfg in configs.values():
        for flag, value, name in (("--steps", args.steps, "steps"), ("--batch-size", args.batch_size, "batch_size")):
            if value is not None:
                if value < 1:
                    raise SystemExit(f"emu-edge train: {flag} must be >= 1")
                setattr(cfg, name, value)
        if args.lr is not None:
            if not args.lr > 0:
                raise SystemExit("emu-edge train: --lr must be > 0")
            cfg.lr = args.lr
        if args.seed is not None:
            cfg.seed = args.seed
    if args.overwrite and "0" not in stages and args.init_from is None:
        raise SystemExit("emu-edge train: --overwrite deletes the whole run, stage 0's vq/ and judge.onnx too; to train "
                         "stage 1 afresh, copy a finished stage 0 into a new --out and pass --resume")
    out = Path(args.out)
    resume, overwrite, progress = args.resume, args.overwrite, not args.no_progress
    try:
        if "0" in stages:
            latest = ckpt.latest_step(out) if resume else None
            reached = json.loads((latest / "state.json").read_text()).get("stage") if latest else None
            if reached == "1":
                print(f"--resume: {out} is past stage 0 (its decoder stage has begun)")
            else:
                train_vq(configs["0"], out, resume=resume, overwrite=overwrite, progress=progress)
                print(f"VQ-VAE written to {out / 'vq'}")
                resume, overwrite = True, False   # the folder now holds this run
        if "1" in stages:
            train_decoder(configs["1"], out, resume=resume, overwrite=overwrite, progress=progress,
                          init_from=args.init_from)
            print(f"Emu3ForConditionalGeneration folder written to {out}")
    except ckpt.CheckpointError as e:
        raise SystemExit(f"emu-edge train: {e}")
    return 0
