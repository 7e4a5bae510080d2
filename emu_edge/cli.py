"""The `emu-edge` command. Each verb lives in its own module and is imported only when
asked for, so `emu-edge caption` on a device never pays for (or needs) torch.

A verb fails with one line, `emu-edge VERB: error: MESSAGE`, and exit code 1; `--debug`
(before or after the verb) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# verb -> (module with add_arguments(parser) and run(args) -> int | None, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("emu_edge.data.cli", "write a folder of generated images and prompts"),
    "train": ("emu_edge.training.cli", "train a model (Emu2's stages; Emu3's VQ-VAE) into a checkpoint"),
    "eval": ("emu_edge.evaluate", "evaluate a checkpoint (or an emu3 bundle) on the held-out test split"),
    "export": ("emu_edge.export.cli", "export a checkpoint to an ONNX bundle"),
    "export-hf": ("emu_edge.export.hf_cli", "export Hugging Face folders (LLM, vision, U-Net) to a bundle"),
    "calibrate": ("emu_edge.calibration.cli", "record each graph's real inputs on a calibration folder"),
    "quantize": ("emu_edge.calibration.cli", "write an INT8 / INT4 / FP16 bundle with an accuracy report"),
    "build-engines": ("emu_edge.export.engines_cli", "build TensorRT engines of a bundle into the engine cache"),
    "caption": ("emu_edge.runtime.cli", "caption an image"),
    "ask": ("emu_edge.runtime.cli", "answer a question about an image"),
    "chat": ("emu_edge.runtime.cli", "chat about images, interactively"),
    "generate": ("emu_edge.runtime.cli", "generate an image from a prompt"),
    "demo": ("emu_edge.runtime.demo", "run the demo on the shipped model"),
    "bench": ("emu_edge.runtime.bench", "measure a bundle's latency, throughput and memory on this device"),
    "serve": ("emu_edge.serve.cli", "serve a bundle over an OpenAI-compatible HTTP API"),
}


# Errors of other libraries that a user's input or files cause, as (module, class name):
# matched by name, so that reporting them never imports (or needs) the library.
KNOWN_ERRORS = {
    ("PIL", "DecompressionBombError"), ("PIL", "UnidentifiedImageError"),
    ("onnxruntime", "InvalidProtobuf"), ("onnxruntime", "Fail"), ("onnxruntime", "InvalidArgument"),
    ("onnxruntime", "InvalidGraph"), ("onnxruntime", "NoSuchFile"), ("google.protobuf", "DecodeError"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: emu-edge [--debug] VERB [options]   (emu-edge VERB --help for a verb's options)", "",
             "  --debug  show the traceback of an error instead of one line", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"emu-edge: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"emu-edge {verb}", description=help_)
    module.add_arguments(parser, verb) if _takes_verb(module.add_arguments) else module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    args = parser.parse_args(rest)
    args.verb = verb
    try:
        code = module.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug or args.debug or not _expected(e):
            raise
        print(f"emu-edge {verb}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return int(code or 0)


def _expected(error: Exception) -> bool:
    """Errors that a user's input, files or machine cause (ours are ValueError or
    RuntimeError subclasses), as opposed to a bug, which keeps its traceback."""
    if isinstance(error, (ValueError, RuntimeError, OSError)):
        return True
    return any((cls.__module__.startswith(module) and cls.__name__ == name)
               for cls in type(error).__mro__ for module, name in KNOWN_ERRORS)


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def thread_count(text: str) -> int:
    """argparse type of --threads: at least 1, and capped (with a warning) at this machine's
    CPU count, since more threads than cores only make the threads wait on each other."""
    threads = int(text)
    if threads < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {threads}")
    cpus = os.cpu_count() or 1
    if threads > cpus:
        print(f"emu-edge: warning: --threads {threads} is more than this machine's {cpus} CPUs; using {cpus}",
              file=sys.stderr)
        return cpus
    return threads


def _takes_verb(fn) -> bool:
    # Modules that serve several verbs (the runtime's) take the verb to pick their options.
    return fn.__code__.co_argcount >= 2


if __name__ == "__main__":
    sys.exit(main())
