"""`emu-edge export CHECKPOINT --out BUNDLE`: our checkpoint -> an ONNX bundle.

A checkpoint is Hugging Face folders per component, so this is `export-hf` applied to
llm/, vision/ and unet/, plus what only our model has: the projections (project_up
folded into embed.onnx, project_down into decoder.onnx as the regression head), the
special tokens, templates, scheduler and the judge.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx

from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.export.hf_cli import ExportError, export_llm
from emu_edge.export.unet import export_unet
from emu_edge.export.vision import export_vision
from emu_edge.runtime.manifest import Emu2Spec, ModelSpec
from emu_edge.runtime.prompt import PromptLayout

VIDEO_FRAMES = 8


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (emu.json, llm/, vision/, unet/, ...)")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    parser.add_argument("--attention", choices=("auto", "gqa", "standard"), default="auto",
                        help="decoder attention variant (see emu-edge export-hf --help)")
    parser.add_argument("--max-length", type=int, default=None, help="longest context (default: the model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    """Errors reach emu_edge.cli, which prints them as one line."""
    out = export_checkpoint(args.checkpoint, args.out, attention=args.attention, max_length=args.max_length,
                            overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _projections(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path} is not a readable safetensors file: {e}") from e


def export_checkpoint(checkpoint: str | Path, out: str | Path, attention: str = "auto",
                      max_length: int | None = None, overwrite: bool = False) -> Path:
    ck = Path(checkpoint)
    if not ck.is_dir():
        raise ExportError(f"no checkpoint folder at {ck}")
    meta_file = ck / "emu.json"
    if not meta_file.is_file():
        raise ExportError(f"{meta_file} does not exist (not an emu-edge checkpoint?)")
    try:
        meta = json.loads(meta_file.read_text())
        layout = PromptLayout.from_dict(meta["prompt"])
        config = meta["config"]
        n_query, frame_n_query = config["n_query"], config["frame_n_query"]
    except (ValueError, KeyError, TypeError) as e:  # PromptLayoutError is a ValueError
        raise ExportError(f"{meta_file} is corrupt: {e}") from e
    proj = _projections(ck / "projections.safetensors")
    start = time.perf_counter()
    with BundleWriter(out, overwrite=overwrite, sources=[ck]) as writer:
        print(f"exporting {ck} to {writer.out}")
        fields = export_llm(ck / "llm", writer, attention=attention,
                            max_length=max_length or config["max_length"],
                            project_down=(proj["project_down.weight"], proj["project_down.bias"]),
                            project_up=(proj["project_up.weight"], proj["project_up.bias"]),
                            image_token_id=layout.token_id(layout.placeholder))
        visual = export_vision(ck / "vision", writer, n_query, frame_n_query)
        visual |= export_unet(ck / "unet", writer, n_query)
        judge = ck / "judge.onnx"
        if judge.is_file():  # calibration and quantization reports score images with it, torch-free
            writer.add_graph("judge", onnx.load(str(judge)))
        writer.write_tokenizer(ck / "tokenizer.json")
        fields.update(
            family="emu2", prompt=layout,
            emu2=Emu2Spec(**visual, video_frames=VIDEO_FRAMES, image_mean=meta["image_mean"],
                          image_std=meta["image_std"], unconditional_embedding=meta["unconditional_embedding"],
                          scheduler=meta["scheduler"]),
            generation=meta["generation_defaults"], architecture="emu-edge",
            source={"checkpoint": ck.name, "preset": config.get("preset")},
        )
        result = writer.finish(ModelSpec(**fields))
    print(f"exported in {time.perf_counter() - start:.1f} s")
    return result
