"""Make the shipped copy of a trained checkpoint: weights only, fp16, judge included.

    python -m emu_edge.training.ship runs/small models/emu-edge-small

No step folders, metrics or plots: those stay with the run. The eval then runs on exactly
what ships (fp16 weights, loaded back as fp32). A run that has not finished ships from its
last complete step folder, and emu.json says which step that was ("training").

Stage 2 trains only the U-Net, and stages 3 and 4 never touch it, so after stage 1 a run can
branch: one copy runs stage 2 while another runs stages 3 and 4 (two cores, or two
machines), and --unet-from joins them:

    python -m emu_edge.training.ship runs/main models/emu-edge-small --unet-from runs/unet

An emu3 run (`--family emu3`) ships as its Emu3ForConditionalGeneration folder at fp16,
from its last complete step, with the generation defaults chosen on val:

    python -m emu_edge.training.ship runs/emu3 models/emu3-edge-small --family emu3 --guidance 3 --top-k 64
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from emu_edge.runtime.bundle import bundle_size
from emu_edge.training.checkpoint import (CheckpointError, latest_step, load_checkpoint, load_step,
                                          save_checkpoint)


def load_run(src: Path):
    """(model, tokenizer, cfg, training info) of a run folder: its final checkpoint, or
    its last complete step when it has not finished."""
    from tokenizers import Tokenizer

    from emu_edge.training.config import EmuConfig
    from emu_edge.training.model import EmuModel
    from emu_edge.training.tokenizer import special_token_ids

    step = latest_step(src) if (src / "steps").is_dir() else None
    state = json.loads((step / "state.json").read_text()) if step else {}
    finished = (src / "emu.json").is_file() and (step is None or state.get("stage_done")
                                                  and state["stage"] == max(state.get("stages", [state["stage"]])))
    if finished:
        model, tokenizer, cfg = load_checkpoint(src)
        training = json.loads((src / "emu.json").read_text()).get("training") or {}
        return model, tokenizer, cfg, {"last_step": step.name if step else None, "complete": True,
                                       **({"init_from": training["init_from"]} if "init_from" in training else {})}
    if step is None:
        raise CheckpointError(f"{src} has neither a checkpoint (emu.json) nor a complete step folder")
    cfg = EmuConfig.from_dict(json.loads((src / "train_config.json").read_text()))
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    cfg.vocab_size = tokenizer.get_vocab_size()
    model = EmuModel(cfg, special_token_ids(tokenizer))
    load_step(step, model)
    return model.eval(), tokenizer, cfg, {"last_step": step.name, "complete": False, "planned_steps": cfg.steps,
                                          **({"init_from": state["init_from"]} if "init_from" in state else {})}


def take_unet(model, training: dict, unet_src: Path) -> None:
    """Swap in the U-Net of a branch that ran stage 2 from the same stage-1 state. The U-Net
    learnt to draw from that run's encoder embeddings, so the encoders must be identical."""
    other, _, _, other_training = load_run(unet_src)
    mine, theirs = model.encoder.state_dict(), other.encoder.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise CheckpointError(f"{unet_src} has a different vision encoder: its U-Net was trained on other "
                              "embeddings (branch both runs from the same finished stage 1)")
    model.unet.load_state_dict(other.unet.state_dict())
    training["unet_from"] = {"run": str(unet_src), **other_training}


def ship(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, generation: dict | None = None,
         unet_from: str | Path | None = None) -> Path:
    """generation: defaults to record in emu.json (e.g. a guidance scale chosen on val).
    unet_from: a run whose U-Net replaces src's (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    model, tokenizer, cfg, training = load_run(src)
    if unet_from is not None:
        take_unet(model, training, Path(unet_from))
    save_checkpoint(model, tokenizer, cfg, dst, dtype=dtype, generation=generation, training=training)
    if (src / "judge.onnx").is_file():
        shutil.copyfile(src / "judge.onnx", dst / "judge.onnx")
    else:  # an unfinished run has not trained its judge yet (it does so last)
        from emu_edge.training.judge import train_judge

        train_judge(cfg, dst / "judge.onnx")
    print(f"shipped {src} -> {dst} ({bundle_size(dst) / 1e6:.1f} MB, {dtype})")
    return dst


def ship_emu3(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
              generation: dict | None = None) -> Path:
    """generation: guidance_scale and top_k to record in generation_config.json."""
    from tokenizers import Tokenizer

    from emu_edge.training.config import Emu3Config
    from emu_edge.training.emu3_format import TokenIds
    from emu_edge.training.train_emu3 import CONFIG_FILE, STAGE, DecoderLoss, build_model, load_stage0, save_folder

    src, dst = Path(src), Path(dst)
    step = latest_step(src) if (src / "steps").is_dir() else None
    if step is None or json.loads((step / "state.json").read_text()).get("stage") != STAGE:
        raise CheckpointError(f"{src} has no step folder of emu3's decoder stage; ship a run that has begun stage 1")
    cfg = Emu3Config.from_dict(json.loads((src / CONFIG_FILE).read_text()))
    for key, value in (generation or {}).items():
        setattr(cfg, key, value)
    vq, processor, _ = load_stage0(src)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    model = DecoderLoss(build_model(cfg, vq, tokenizer, TokenIds.of(tokenizer, vq.config.codebook_size)))
    load_step(step, model)
    dst.mkdir(parents=True, exist_ok=True)
    save_folder(model.model.eval(), tokenizer, processor, cfg, dst, dtype=dtype)
    shutil.copyfile(src / "judge.onnx", dst / "judge.onnx")
    print(f"shipped {step} -> {dst} ({bundle_size(dst) / 1e6:.1f} MB, {dtype})")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--guidance", type=float, help="default guidance scale to record (choose it on val)")
    parser.add_argument("--steps", type=int, help="default denoising steps to record")
    parser.add_argument("--unet-from", help="run whose U-Net (stage 2, from the same stage 1) replaces src's")
    parser.add_argument("--family", choices=("emu2", "emu3"), default="emu2")
    parser.add_argument("--top-k", type=int, help="emu3: default top-k of image sampling to record")
    args = parser.parse_args()
    if args.family == "emu3":
        if args.steps is not None or args.unet_from is not None:
            raise SystemExit("ship: --steps and --unet-from are for emu2 runs; emu3 draws images token by token")
        chosen = {k: v for k, v in (("guidance_scale", args.guidance), ("top_k", args.top_k)) if v is not None}
        try:
            ship_emu3(args.src, args.dst, generation=chosen)
        except CheckpointError as e:
            raise SystemExit(f"ship: {e}")
        return
    generation = {k: v for k, v in (("guidance", args.guidance), ("steps", args.steps)) if v is not None}
    try:
        ship(args.src, args.dst, generation=generation, unet_from=args.unet_from)
    except CheckpointError as e:
        raise SystemExit(f"ship: {e}")


if __name__ == "__main__":
    main()
