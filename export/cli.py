"""`emu-edge export CHECKPOINT --out BUNDLE`: our checkpoint -> an ONNX bundle.

A checkpoint is Hugging Face folders per component, so this is `export-hf`'s emu2 recipe
(export/specs.py) applied to llm/, vision/ and unet/, plus what only our model has: the projections (project_up
where the decoder splices visual embeddings in, project_down as its regression head), the
special tokens, templates, scheduler and the judge.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.export.hf_cli import ExportError, load_llm
from emu_edge.export.specs import ExportInputs, export_recipe
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
        llm = load_llm(ck / "llm", family="llm")
        inputs = ExportInputs(
            llm=llm, attention=attention, max_length=llm.max_length(max_length or config["max_length"]),
            project_down=(proj["project_down.weight"], proj["project_down.bias"]),
            project_up=(proj["project_up.weight"], proj["project_up.bias"]),
            image_token_id=layout.placeholder_id, vision=ck / "vision", unet=ck / "unet",
            n_query=n_query, frame_n_query=frame_n_query, judge=ck / "judge.onnx")
        fields = export_recipe("emu2", writer, inputs)
        writer.write_tokenizer(ck / "tokenizer.json")
        model = dict(fields["model"])
        model.update(
            family="emu2", prompt=layout,
            emu2=Emu2Spec(**fields["emu2"], video_frames=VIDEO_FRAMES, image_mean=meta["image_mean"],
                          image_std=meta["image_std"], unconditional_embedding=meta["unconditional_embedding"],
                          scheduler=meta["scheduler"]),
            generation=meta["generation_defaults"], architecture="emu-edge",
            source={"checkpoint": ck.name, "preset": config.get("preset")},
        )
        result = writer.finish(ModelSpec(**model))
    print(f"exported in {time.perf_counter() - start:.1f} s")
    return result
