"""Runtime verbs: caption, ask, chat, generate. Torch-free: they need a bundle only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from emu_edge.cli import thread_count


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the shipped model, exported "
                                                    "once into $EMU_EDGE_CACHE, ~/.cache/emu-edge)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    parser.add_argument("--threads", type=thread_count,
                        help="CPU threads per graph (default: onnxruntime's; more than the machine's CPUs are "
                             "capped at its CPU count, with a warning)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", choices=("ddim", "euler", "dpm++"), default=None)
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "caption":
        parser.add_argument("image", help="an image file")
        _sampling(parser)
    elif verb == "ask":
        parser.add_argument("image", help="an image file")
        parser.add_argument("question")
        _sampling(parser)
    elif verb == "chat":
        _sampling(parser)
    elif verb == "generate":
        parser.add_argument("prompt", help='what to draw, e.g. "a red circle"')
        parser.add_argument("-o", "--output", required=True, type=Path,
                            help="image file to write (.png, .jpg, ...); its folder must exist, unless --mkdir")
        parser.add_argument("--mkdir", action="store_true", help="create the folder of --output if it is missing")
        parser.add_argument("--image", action="append", default=[],
                            help="a subject image the prompt edits (subject-driven), e.g. --image cat.png "
                                 '"make it blue"; repeatable')
        _image_options(parser)
    _common(parser)


def load_pipeline(args, log=lambda *a: print(*a, file=sys.stderr)):
    from emu_edge.runtime.pipeline import Pipeline
    from emu_edge.runtime.shipped import default_bundle

    bundle = args.bundle if args.bundle is not None else default_bundle(log=log)
    return Pipeline.load(bundle, device=args.device, backend=args.backend, threads=args.threads)


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _emit(args, text: str, **fields) -> None:
    print(json.dumps({"text": text, **fields}) if args.json else text)


def run(args: argparse.Namespace) -> int:
    """Errors reach emu_edge.cli, which prints them as one line."""
    from emu_edge.runtime.images import check_output_path, load_image

    # The user's files are checked before the bundle is loaded or anything generated.
    if args.verb in ("caption", "ask"):
        image = load_image(args.image)
    elif args.verb == "generate":
        check_output_path(args.output, mkdir=args.mkdir)
        images = [load_image(p) for p in args.image]
    pipe = load_pipeline(args)
    if args.verb in ("caption", "ask"):
        items = [image] if args.verb == "caption" else [image, args.question]
        t0 = time.perf_counter()
        text = pipe.generate_text(items, **_sampling_kwargs(args))
        _emit(args, text, image=str(args.image), seconds=round(time.perf_counter() - t0, 4))
    elif args.verb == "generate":
        items = images + [args.prompt]
        t0 = time.perf_counter()
        image = pipe.generate_image(items, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                    seed=args.seed, progress=None if args.json else _progress)
        image.save(args.output)
        _emit(args, str(args.output), seconds=round(time.perf_counter() - t0, 4))
    elif args.verb == "chat":
        return _chat(pipe, args)
    return 0


def _progress(done: int, total: int) -> None:
    bar = "#" * int(30 * done / total)
    print(f"\rdenoising [{bar:<30}] {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


CHAT_HELP = """Type a message and press enter. Add images with /image PATH (they join your next
message), start over with /reset, leave with /quit (or Ctrl-D)."""


def _chat(pipe, args) -> int:
    from PIL import Image

    from emu_edge.runtime.images import load_image

    conversation = pipe.conversation()
    pending = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation, pending = pipe.conversation(), []
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image "):
            try:
                pending.append(load_image(line[len("/image "):].strip()))
                print(f"(image {len(pending)} added)", file=sys.stderr)
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bad image never ends the chat
                print(f"error: {e}", file=sys.stderr)
            continue
        try:
            print("emu> ", end="", flush=True)
            for piece in conversation.stream([*pending, line], **_sampling_kwargs(args)):
                print(piece, end="", flush=True)
            print()
        except (ValueError, RuntimeError) as e:
            print(f"\nerror: {e}", file=sys.stderr)
        pending = []
