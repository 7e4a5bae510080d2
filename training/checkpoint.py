"""Checkpoints: Hugging Face folders per component (DESIGN.md), and resumable step folders.

    checkpoint/emu.json, llm/, vision/, unet/, projections.safetensors, tokenizer.json, judge.onnx
    checkpoint/steps/<stage>-<step>/  model.safetensors, optimizer.safetensors, optimizer.json,
                                      rng.safetensors, state.json
    checkpoint/steps/latest.json      {"step": name of the last complete step folder}

Every file is safetensors, JSON or ONNX: nothing is unpickled. Step folders are written under
a temporary name and renamed, and `latest` is replaced atomically, so a run killed at any
moment resumes from the last complete step. They are ordered by their numbers (stage, then
step), not their names, and pruning keeps the one just written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emu_edge.runtime.prompt import emu2_layout
from emu_edge.training.config import EmuConfig
from emu_edge.training.batching import IMAGE_MEAN, IMAGE_STD

EMU_JSON = "emu.json"
# folder -> (library, class): each component loads with its own library's from_pretrained.
COMPONENTS = {"llm": ("transformers", "LlamaForCausalLM"), "vision": ("transformers", "CLIPVisionModel"),
              "unet": ("diffusers", "UNet2DConditionModel")}
LATEST = "latest.json"
# Everything a run writes into its folder; `train --overwrite` removes these and nothing else.
RUN_FILES = (EMU_JSON, *COMPONENTS, "projections.safetensors", "tokenizer.json", "judge.onnx", "steps",
             "metrics.jsonl", "train_config.json", "loss.png", "vq",
             # emu3's decoder stage: the Emu3ForConditionalGeneration folder is the run folder
             "decoder_config.json", "config.json", "model.safetensors", "generation_config.json",
             "tokenizer_config.json", "processor_config.json")
_STEP_NAME = re.compile(r"(\d+)-(\d+)")


class CheckpointError(RuntimeError):
    pass


def run_files(out: Path) -> list[Path]:
    """What an earlier run left in `out`."""
    return [out / name for name in RUN_FILES if (out / name).exists()]


def clear_run(out: Path) -> None:
    for path in run_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


GENERATION_DEFAULTS = {"max_new_tokens": 32, "steps": 25, "guidance": 3.0, "scheduler": "ddim"}


def emu_json(model, cfg: EmuConfig, generation: dict | None = None, training: dict | None = None) -> dict:
    return {
        "format": "emu-edge-checkpoint",
        "version": 1,
        # Every model size (n_query, frame_n_query, image_size, visual_dim = vision_hidden)
        # is stored once, here.
        "config": cfg.to_dict(),
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        # The prompt layout as data, special-token ids included: the exporter copies it
        # into the bundle's manifest and the runtime executes it.
        "prompt": emu2_layout(model.token_ids).to_dict(),
        "unconditional_embedding": {"kind": "zeros"},
        "scheduler": {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")},
        "generation_defaults": {**GENERATION_DEFAULTS, **(generation or {})},
        "training": training or {},
    }


def save_checkpoint(model, tokenizer, cfg: EmuConfig, out: str | Path, dtype=torch.float32,
                    generation: dict | None = None, training: dict | None = None) -> Path:
    """Write the weights-only checkpoint; each component goes to a temporary folder first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    parts = {"llm": model.llm, "vision": model.encoder.model, "unet": model.unet}
    for name, module in parts.items():
        module.to(dtype).save_pretrained(tmp / name)
        module.to(torch.float32)
    tokenizer.save(str(tmp / "llm" / "tokenizer.json"))  # so llm/ alone is a usable HF folder
    tensors = {f"{p}.{k}": v.detach().to(dtype).contiguous()
               for p in ("project_up", "project_down") for k, v in getattr(model, p).state_dict().items()}
    save_file(tensors, str(tmp / "projections.safetensors"))
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / EMU_JSON).write_text(json.dumps(emu_json(model, cfg, generation, training), indent=2))
    for name in (*COMPONENTS, "projections.safetensors", "tokenizer.json", EMU_JSON):
        src, dst = tmp / name, out / name
        if src.is_dir():
            replace_dir(src, dst)
        else:
            os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    return path


def load_checkpoint(path: str | Path):
    """-> (EmuModel in fp32 eval mode, tokenizers.Tokenizer, EmuConfig). Errors name the file."""
    from tokenizers import Tokenizer

    from emu_edge.training.model import EmuModel

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    meta_file = _check(path / EMU_JSON)
    try:
        meta = json.loads(meta_file.read_text())
        cfg = EmuConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {meta_file}: {e}") from e
    tok_file = _check(path / "tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise CheckpointError(f"corrupt checkpoint file {tok_file}: {e}") from e
    loaded = {}
    for name, (library, class_name) in COMPONENTS.items():
        cls = getattr(importlib.import_module(library), class_name)
        folder = path / name
        _check(folder / "config.json")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"checkpoint file missing: {folder}/*.safetensors")
        for w in weights:  # a truncated file fails here with its name, not deep in from_pretrained
            try:
                load_file(str(w))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt checkpoint file {w}: {e}") from e
        try:
            loaded[name] = cls.from_pretrained(str(folder)).float().eval()
        except Exception as e:
            raise CheckpointError(f"cannot load {folder} with {cls.__name__}.from_pretrained: {e}") from e
    proj_file = _check(path / "projections.safetensors")
    try:
        proj = load_file(str(proj_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint file {proj_file}: {e}") from e
    model = EmuModel(cfg, checkpoint_token_ids(meta), **loaded)
    for p in ("project_up", "project_down"):
        getattr(model, p).load_state_dict({k.split(".", 1)[1]: v.float() for k, v in proj.items() if k.startswith(p + ".")})
    return model.eval(), tokenizer, cfg


def checkpoint_token_ids(meta: dict) -> dict[str, int]:
    """Special-token ids from emu.json: inside its prompt layout (checkpoints written before
    the layout was data kept them in a `special_tokens` map)."""
    return dict(meta["prompt"]["tokens"] if "prompt" in meta else meta["special_tokens"])


# --- resumable training state -------------------------------------------------------------

def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, s in state["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {int(i): dict(s) for i, s in meta["state"].items()}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_step(out: Path, name: str, model, optimizer, state: dict, keep: int = 2) -> Path:
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    tmp = steps / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    final = steps / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = steps / ".latest.json.tmp"
    pointer.write_text(json.dumps({"step": name}))
    os.replace(pointer, steps / LATEST)
    # By number, not name: "0-1000000" sorts before "0-999999" as a name.
    others = sorted((p for p in steps.iterdir() if p.is_dir() and p != final and _step_number(p.name)),
                    key=lambda p: _step_number(p.name))
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_number(name: str) -> tuple[int, int] | None:
    """(stage, step) of a step folder's name "<stage>-<step>"; None for anything else."""
    match = _STEP_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def latest_step(out: Path) -> Path | None:
    pointer = out / "steps" / LATEST
    if not pointer.exists():
        return None
    try:
        folder = out / "steps" / json.loads(pointer.read_text())["step"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{pointer} is corrupt ({e}); delete it to resume from scratch") from e
    if not (folder / "state.json").exists():
        raise CheckpointError(f"{pointer} names {folder}, which is incomplete or missing")
    return folder


def load_step(folder: Path, model, optimizer=None) -> dict:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if optimizer is not None:
        meta = json.loads((folder / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), meta))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    return json.loads((folder / "state.json").read_text())
