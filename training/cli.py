"""`emu-edge train`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="tiny (tests) or small (the shipped default)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (and to resume from)")
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default: the preset's)")
    parser.add_argument("--stages", default="0,1,2,3,4,5", help="comma-separated stages to run, in order")
    parser.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    parser.add_argument("--seed", type=int,
                        help="seed of the data stream and fresh weights (default: the preset's); give a continuation "
                             "(--init-from) a new one so it sees new samples, not the ones its source trained on")
    parser.add_argument("--resume", action="store_true", help="continue from the folder's last complete step")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start from a finished checkpoint's weights (e.g. the shipped model) instead of fresh ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from emu_edge.training.checkpoint import CheckpointError
    from emu_edge.training.config import get_preset
    from emu_edge.training.train import STAGES, train

    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise SystemExit(f"emu-edge train: {e}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise SystemExit(f"emu-edge train: unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    if stages != sorted(stages, key=int):
        raise SystemExit("emu-edge train: --stages must be in increasing order")
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("emu-edge train: --steps must be >= 1")
        cfg.steps = {s: args.steps for s in cfg.steps}
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.seed is not None:
        cfg.seed = args.seed
    try:
        out = train(cfg, args.out, stages, resume=args.resume, progress=not args.no_progress,
                    init_from=args.init_from)
    except CheckpointError as e:
        raise SystemExit(f"emu-edge train: {e}")
    print(f"checkpoint written to {out}")
    return 0
