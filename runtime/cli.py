"""Runtime verbs: caption, ask, chat, generate. Torch-free: they need a bundle only."""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--system", default=None,
                        help="a system prompt (bundles whose prompt layout has one: an Emu3 folder's chat template)")


def _image_options(parser: argparse.ArgumentParser) -> None:
    # Each family takes only its own options (FAMILY_OPTIONS); both take --guidance and --seed.
    emu2 = parser.add_argument_group("emu2 bundles (a U-Net denoises the image)")
    emu2.add_argument("--image", action="append", default=[],
                      help="a subject image the prompt edits (subject-driven), e.g. --image cat.png "
                           '"make it blue"; repeatable')
    emu2.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    emu2.add_argument("--scheduler", choices=("ddim", "euler", "dpm++"), default=None)
    emu3 = parser.add_argument_group("emu3 bundles (the decoder writes the image as visual tokens)")
    emu3.add_argument("--height", type=int, default=None,
                      help="image height in pixels, a multiple of the VQ factor (default: the bundle's image area, "
                           "square)")
    emu3.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    emu3.add_argument("--negative-prompt", default=None,
                      help="what the guidance steers away from (default: an empty prompt)")
    emu3.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest image tokens "
                                                                "(default: the bundle's; 1 is greedy)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the bundle's; 1 turns it off)")
    parser.add_argument("--seed", type=int, default=0)


# generate's options that only one family reads: (attribute, flag) per family.
FAMILY_OPTIONS = {
    "emu2": (("image", "--image"), ("steps", "--steps"), ("scheduler", "--scheduler")),
    "emu3": (("height", "--height"), ("width", "--width"), ("negative_prompt", "--negative-prompt"),
             ("top_k", "--top-k")),
}


def check_family_options(args, family: str) -> None:
    """Refuse, by name, generate options that this bundle's family does not read, before
    anything is loaded or generated."""
    if family not in FAMILY_OPTIONS:
        return   # a text-only bundle: the Pipeline names what it lacks
    given = [flag for other, options in FAMILY_OPTIONS.items() if other != family
             for attr, flag in options if getattr(args, attr, None) not in (None, [])]
    if given:
        own = [flag for _, flag in FAMILY_OPTIONS[family]] + ["--guidance", "--seed"]
        raise ValueError(f"{', '.join(given)} {'is not an option' if len(given) == 1 else 'are not options'} of "
                         f"{family} bundles, where generate takes {', '.join(own)}")


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
        _image_options(parser)
    _common(parser)


def load_pipeline(args, log=lambda *a: print(*a, file=sys.stderr), check=None):
    """The Pipeline of --bundle (or the shipped model). check(bundle), if given, runs on the
    opened bundle before any graph is loaded."""
    from emu_edge.runtime.bundle import Bundle
    from emu_edge.runtime.pipeline import Pipeline
    from emu_edge.runtime.shipped import default_bundle

    bundle = Bundle.open(args.bundle if args.bundle is not None else default_bundle(log=log))
    if check is not None:
        check(bundle)
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
    check = None
    if args.verb == "generate":
        def check(bundle):
            check_family_options(args, bundle.manifest.model.family)
    pipe = load_pipeline(args, check=check)
    if args.verb in ("caption", "ask"):
        items = [image] if args.verb == "caption" else [image, args.question]
        t0 = time.perf_counter()
        text = pipe.generate_text(items, system=args.system, **_sampling_kwargs(args))
        _emit(args, text, image=str(args.image), seconds=round(time.perf_counter() - t0, 4))
    elif args.verb == "generate":
        t0 = time.perf_counter()
        if pipe.manifest.model.family == "emu3":
            progress = None if args.json else progress_bar("image tokens")
            if not args.json:   # what the image will hold in memory, before it is allocated
                print(pipe.image_memory([args.prompt], args.height, args.width, args.guidance, args.negative_prompt),
                      file=sys.stderr)
            image = pipe.generate_image(args.prompt, height=args.height, width=args.width, guidance=args.guidance,
                                        negative_prompt=args.negative_prompt, top_k=args.top_k, seed=args.seed,
                                        progress=progress)
        else:
            progress = None if args.json else progress_bar("denoising")
            image = pipe.generate_image(images + [args.prompt], steps=args.steps, guidance=args.guidance,
                                        scheduler=args.scheduler, seed=args.seed, progress=progress)
        save_image(image, args.output)
        _emit(args, str(args.output), seconds=round(time.perf_counter() - t0, 4))
    elif args.verb == "chat":
        return _chat(pipe, args)
    return 0


def save_image(image, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename: an interrupted or
    failed save leaves no partial file at `path`."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def progress_bar(label: str):
    """A one-line bar on stderr, redrawn as steps finish: `label [####   ] 3/8`."""
    def progress(done: int, total: int) -> None:
        bar = "#" * int(30 * done / total)
        print(f"\r{label} [{bar:<30}] {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)

    return progress


CHAT_HELP = """Type a message and press enter. Add images with /image PATH (they join your next
message), start over with /reset, leave with /quit (or Ctrl-D)."""


def _chat(pipe, args) -> int:
    from PIL import Image

    from emu_edge.runtime.images import load_image

    conversation = pipe.conversation(system=args.system)
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
            conversation, pending = pipe.conversation(system=args.system), []
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
