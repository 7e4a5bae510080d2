"""The training loop: Emu2's stages at small scale, resumable, DDP-ready.

Stage 0  encoder: the vision encoder alone learns, for each of its pooled embeddings, the
         colour, shape and size of the object under it; the stand-in for the pretrained
         EVA-CLIP Emu2 starts from (a ViT trained from scratch inside stage 1 confused shapes
         in over half of its captions).
Stage 1  captioning: encoder, project_up and decoder learn; text loss.
Stage 2  visual decoder: the U-Net alone, an autoencoder over the frozen encoder's
         embeddings; diffusion loss, condition dropped 10% of the time (for CFG).
Stage 3  joint: text cross-entropy + L2 regression of visual embeddings (text-to-image
         and subject-driven pairs); encoder frozen.
Stage 4  instruction tuning ([USER]: ... [ASSISTANT]: ..., loss on answers only) on VQA,
         chat, few-shot and video, replaying stage 3's tasks so they are not forgotten.
Stage 5  generation alignment (ours, not in Emu2): the U-Net alone again, now conditioned on
         the embeddings the decoder regresses from text prompts, mixed with the encoder's
         own embeddings so that autoencoding and subject-driven generation are kept. The L2
         regression of stage 3 predicts the mean over every image a prompt allows (an
         object's position is not in the prompt), a blur the stage-2 U-Net never saw; at
         Emu2's scale the regressed embeddings are sharp enough, at ours they are not.

Every batch is a pure function of (seed, stage, step): the data position and all noise
follow from the step counter, so resuming, and sharding one global batch across DDP ranks,
reproduce the uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from emu_edge import data
from emu_edge.runtime.bundle import overlap
from emu_edge.runtime.prompt import PromptBuilder, emu2_builder
from emu_edge.training import checkpoint as ckpt
from emu_edge.training.batching import (ATTRIBUTE_CLASSES, attribute_targets, collate, encode, image_of,
                                        length_chunks, to_pixels, visual_sequence)
from emu_edge.training.config import EmuConfig
from emu_edge.training.model import EmuModel
from emu_edge.training.tokenizer import encode_text_fn, special_token_ids, train_tokenizer


@dataclass(frozen=True)
class Stage:
    name: str
    tasks: dict[str, float]
    trainable: tuple[str, ...]
    kind: str  # "attributes", "text", "diffusion" or "alignment"


STAGES: dict[str, Stage] = {
    "0": Stage("encoder", {"captioning": 0.75, "digits": 0.25}, ("encoder", "attribute_head"), "attributes"),
    "1": Stage("captioning", {"captioning": 0.75, "digits": 0.25}, ("encoder", "project_up", "llm"), "text"),
    "2": Stage("visual decoder", {"captioning": 0.4, "text_to_image": 0.3, "digits": 0.2, "subject": 0.1},
               ("unet",), "diffusion"),
    "3": Stage("joint", {"text_to_image": 0.4, "subject": 0.2, "captioning": 0.25, "digits": 0.15},
               ("llm", "project_up", "project_down"), "text"),
    "4": Stage("instruction", {"vqa": 0.25, "chat": 0.15, "fewshot": 0.12, "video": 0.13, "captioning": 0.1,
                               "digits": 0.05, "text_to_image": 0.14, "subject": 0.06},
               ("llm", "project_up", "project_down"), "text"),
    "5": Stage("generation alignment", {"text_to_image": 0.5, "captioning": 0.25, "digits": 0.1, "subject": 0.15},
               ("unet",), "alignment"),
}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StageLoss(nn.Module):
    """One module whose forward is a stage's loss, so DDP can wrap it."""

    def __init__(self, model: EmuModel, stage: Stage, builder: PromptBuilder):
        super().__init__()
        self.model = model
        self.stage = stage
        self.builder = builder
        # prompt -> regressed embeddings. The decoder is frozen in the alignment stage, so
        # they never change, and the prompt grammar is closed: most batches hit the cache.
        self.regressed: dict[str, torch.Tensor] = {}

    def forward(self, batch, counts: tuple[int, int]):
        if self.stage.kind in ("diffusion", "alignment"):
            return self._diffusion(*batch, n_global=counts[0])
        if self.stage.kind == "attributes":
            return self._attributes(*batch, n_global=counts[0])
        return self._text(batch, counts)

    def _attributes(self, images, targets, n_global):
        m = self.model
        logits = m.attribute_head(m.encoder(images, m.cfg.n_query))  # [B, n, classes]
        parts, first = {}, 0
        for i, (name, classes) in enumerate(ATTRIBUTE_CLASSES.items()):
            group = logits[..., first:first + len(classes)]
            first += len(classes)
            # Summed here, divided by the global count of labelled cells: a shard's share of
            # the single-process mean, as for the text loss.
            parts[name] = F.cross_entropy(group.flatten(0, 1), targets[..., i].flatten(), ignore_index=-100,
                                          reduction="sum") / max(n_global, 1)
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def _visuals(self, batch):
        m, cfg = self.model, self.model.cfg
        with torch.set_grad_enabled("encoder" in self.stage.trainable):
            img = m.encoder(batch.images, cfg.n_query) if batch.images is not None else None
            frm = m.encoder(batch.frames, cfg.frame_n_query) if batch.frames is not None else None
        return visual_sequence(batch, img, frm)

    def _text(self, batch, counts):
        m = self.model
        n_tokens, n_regress = counts
        visual = self._visuals(batch)
        embeds = m.embed(batch.input_ids, visual)
        logits, regressed, _ = m.decode(embeds, attention_mask=batch.attention_mask)
        # Sums over the local shard, normalised by the GLOBAL counts: summed over ranks this
        # is exactly the single-process loss (DDP then averages, hence the world factor).
        ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="sum")
        ce = ce / max(n_tokens, 1)
        l2 = logits.new_zeros(())
        if batch.regress.any():
            full = torch.zeros(*batch.input_ids.shape, visual.shape[-1])
            full[batch.input_ids == m.token_ids["<image>"]] = visual.detach()
            where = batch.regress[:, :-1]
            pred, target = regressed[:, :-1][where], full[:, 1:][where]
            l2 = ((pred - target) ** 2).sum() / (max(n_regress, 1) * visual.shape[-1])
        loss = ce + m.cfg.regress_weight * l2
        return loss, {"ce": ce.detach(), "l2": l2.detach()}

    def _diffusion(self, images, noise, timesteps, drop, prompts, n_global):
        m = self.model
        with torch.no_grad():
            cond = m.encoder(images, m.cfg.n_query)
            for i, prompt in enumerate(prompts):
                if prompt is not None:
                    cond[i] = self._regress(prompt)
        # This shard's share of the global mean, as for the text loss.
        loss = m.diffusion_loss(images, cond, noise, timesteps, drop) * (len(images) / n_global)
        return loss, {"mse": loss.detach()}

    def _regress(self, prompt: str) -> torch.Tensor:
        if prompt not in self.regressed:
            from emu_edge.training.generate import regress

            was_training = self.model.training
            self.model.eval()  # the same embeddings generation will see (no dropout)
            self.regressed[prompt] = regress(self.model, self.builder, "text_to_image", [("text", prompt)])
            self.model.train(was_training)
        return self.regressed[prompt]


def stage_tasks(cfg: EmuConfig, stage_id: str) -> dict[str, float]:
    """The task weights a stage trains on: the run's `--mix` for it, else the stage's own."""
    return cfg.mixes.get(stage_id) or STAGES[stage_id].tasks


def global_samples(cfg: EmuConfig, stage_id: str, step: int):
    first = step * cfg.batch_size
    seed = cfg.seed * 10 + int(stage_id)
    tasks = stage_tasks(cfg, stage_id)
    return [data.mixture(tasks, "train", first + i, seed=seed, size=cfg.image_size)
            for i in range(cfg.batch_size)]


def make_batch(cfg, stage_id, step, rank, world, builder, pad_id, model):
    """This rank's shard of the global batch for (stage, step) as a list of chunks whose
    gradients the step sums (text stages: length-sorted; the others: one), and the global
    counts every chunk's loss is normalised by."""
    samples = global_samples(cfg, stage_id, step)
    shard = slice(rank, None, world)
    if STAGES[stage_id].kind == "attributes":
        images = to_pixels(np.stack([image_of(s) for s in samples]))
        targets = torch.stack([attribute_targets(s, cfg.n_query) for s in samples])
        return [(images[shard], targets[shard])], (int((targets[..., 0] != -100).sum()), 0)
    if STAGES[stage_id].kind in ("diffusion", "alignment"):
        images = to_pixels(np.stack([image_of(s) for s in samples]))
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + int(stage_id)) * 1_000_003 + step)
        noise = torch.randn(images.shape, generator=g)
        timesteps = torch.randint(0, cfg.train_timesteps, (len(samples),), generator=g)
        drop = torch.rand(len(samples), generator=g) < cfg.cfg_drop
        # Alignment conditions text-to-image targets on what the decoder regresses from
        # their prompt; every other image on its own encoder embeddings.
        aligned = STAGES[stage_id].kind == "alignment"
        prompts = [s.segments[0].value if aligned and s.task == "text_to_image" else None for s in samples]
        return [(images[shard], noise[shard], timesteps[shard], drop[shard], prompts[shard])], (len(samples), 0)
    encoded = encode(samples, builder)
    counts = (sum(t != -100 for e in encoded for t in e.targets), sum(bool(r) for e in encoded for r in e.regress))
    # Summed over chunks normalised by the global counts, the step equals one padded batch's.
    return [collate(c, pad_id) for c in length_chunks(encoded[rank::world], cfg.text_chunks)], counts


def set_trainable(model: EmuModel, names: tuple[str, ...]) -> list[nn.Parameter]:
    model.requires_grad_(False)
    params = []
    for name in names:
        module = getattr(model, name)
        module.requires_grad_(True)
        params += list(module.parameters())
    return params


def init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def prepare(cfg: EmuConfig, out: Path, resume: bool, log, init_from: Path | None = None):
    """Tokenizer and model: fresh, the run's own when resuming, or a finished checkpoint's
    (init_from: continue training a shipped model with later stages)."""
    from tokenizers import Tokenizer

    tok_file = out / "tokenizer.json"
    if resume:
        if not tok_file.exists() or ckpt.latest_step(out) is None:
            raise ckpt.CheckpointError(f"--resume: nothing to resume in {out} (no steps/latest.json); "
                                       "start without --resume")
        tokenizer = Tokenizer.from_file(str(tok_file))
    elif init_from is not None:
        model, tokenizer, theirs = ckpt.load_checkpoint(init_from)
        _check_same_model(cfg, theirs, init_from)
        cfg.vocab_size = theirs.vocab_size
        log(f"initialised from {init_from}")
        return model, tokenizer
    else:
        tokenizer = train_tokenizer(data.corpus(), cfg.vocab_size)
    token_ids = special_token_ids(tokenizer)
    cfg.vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(cfg.seed)
    model = EmuModel(cfg, token_ids)
    log(f"model: vision {_count(model.encoder)/1e6:.2f}M, decoder {_count(model.llm)/1e6:.2f}M, "
        f"U-Net {_count(model.unet)/1e6:.2f}M parameters; vocab {cfg.vocab_size}")
    return model, tokenizer


# Settings of the run, not of the model: --init-from may change these.
_TRAINING_FIELDS = {"preset", "vocab_size", "batch_size", "steps", "lr", "encoder_lr", "warmup", "weight_decay",
                    "grad_clip", "regress_weight", "save_every", "seed", "cfg_drop", "mixes", "text_chunks"}


def _check_same_model(cfg: EmuConfig, theirs: EmuConfig, path: Path) -> None:
    mine, other = cfg.to_dict(), theirs.to_dict()
    differ = [k for k in mine if k not in _TRAINING_FIELDS and mine[k] != other[k]]
    if differ:
        raise ckpt.CheckpointError(f"--init-from {path}: its model differs from preset {cfg.preset!r} in "
                                   + ", ".join(f"{k} ({other[k]} vs {mine[k]})" for k in differ)
                                   + f"; pass the preset it was trained with (--preset {theirs.preset})")


# What decides the samples and their order: a resumed run must keep them.
_STREAM_FIELDS = ("seed", "batch_size", "mixes")


def check_same_stream(cfg: EmuConfig, out: Path, name: str = "train_config.json") -> None:
    """name: the file the run's config was written to when it started."""
    saved = json.loads((out / name).read_text()) if (out / name).is_file() else {}
    mine = cfg.to_dict()
    differ = [k for k in _STREAM_FIELDS if k in saved and saved[k] != mine[k]]
    if differ:
        raise ckpt.CheckpointError("--resume: the run was started with " + ", ".join(
            f"{k}={saved[k]} (now {mine[k]})" for k in differ) + "; pass the same --seed, --batch-size and --mix")


def claim(out: Path, resume: bool, overwrite: bool, init_from, rank: int, world: int, log) -> None:
    """Refuse to start a new run over an old one: its metrics would mix with the new ones and
    its step folders would outlive (and be resumed instead of) the new run's."""
    if resume and overwrite:
        raise ckpt.CheckpointError("--resume continues the run in --out and --overwrite deletes it; pass one of them")
    old = ckpt.run_files(out)
    if resume or not old:
        return
    if not overwrite:
        raise ckpt.CheckpointError(
            f"{out} already holds a run ({', '.join(p.name for p in old)}); pass --resume to continue it, "
            "--overwrite to delete it and start over, or choose another --out")
    if init_from is not None and overlap(init_from, out):
        raise ckpt.CheckpointError(f"--overwrite would delete --init-from {init_from}, which is or lies in {out}")
    if rank == 0:
        log(f"--overwrite: deleting the run in {out} ({', '.join(p.name for p in old)})")
        ckpt.clear_run(out)
    if world > 1:
        dist.barrier()


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(cfg: EmuConfig, out: str | Path, stages: list[str], resume: bool = False,
          stop_after: int | None = None, judge: bool = True, progress: bool = True,
          init_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run `stages` in order into `out`. stop_after: end (as if killed) after that many
    optimizer steps in this call; the tests use it to interrupt a run and resume it.
    init_from: a finished checkpoint folder to start from instead of fresh weights.
    A folder that holds a run is continued (resume) or deleted first (overwrite), never
    silently trained over."""
    out = Path(out)
    rank, world = init_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must divide by the {world} ranks")
    log = print if rank == 0 else (lambda *a, **k: None)
    if resume and init_from is not None:
        raise ckpt.CheckpointError("--resume continues the run's own steps; drop --init-from")
    if resume and ((out / "vq").is_dir() or (out / "decoder_config.json").is_file()):
        raise ckpt.CheckpointError(f"--resume: {out} holds an emu3 run (vq/, the decoder stage); pass --family emu3")
    claim(out, resume, overwrite, init_from, rank, world, log)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = prepare(cfg, out, resume, log, Path(init_from) if init_from is not None else None)
    if rank == 0 and not resume:
        tokenizer.save(str(out / "tokenizer.json"))
        (out / "train_config.json").write_text(cfg.dumps())
    builder = emu2_builder(model.token_ids, encode_text_fn(tokenizer), cfg.n_query, cfg.frame_n_query)
    pad_id = model.token_ids["<pad>"]

    start_stage, start_step = stages[0], 0
    resume_folder = ckpt.latest_step(out) if resume else None
    if resume_folder is not None:
        check_same_stream(cfg, out)
        state = json.loads((resume_folder / "state.json").read_text())
        start_stage, start_step = state["stage"], state["step"]
        init_from = state.get("init_from")
        if state.get("stage_done"):
            later = [s for s in stages if int(s) > int(start_stage)]
            if not later:
                log(f"--resume: {out} already finished stages {','.join(stages)}")
                ckpt.load_step(resume_folder, model)
                return _finish(model, tokenizer, cfg, out, rank, judge, init_from)
            start_stage, start_step = later[0], 0
    todo = [s for s in stages if int(s) >= int(start_stage)]

    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    steps_run = 0
    for stage_id in todo:
        stage = STAGES[stage_id]
        total = cfg.steps[stage_id]
        params = set_trainable(model, stage.trainable)
        model.train()
        # The vision transformer learns from scratch and diverges from shape cues at the
        # decoder's learning rate (a probe: 32% vs 76% shape accuracy after 300 steps at
        # 2e-3 vs 5e-4), so it gets its own, lower peak.
        encoder_params = {id(p) for p in model.encoder.parameters()}
        groups = [{"params": [p for p in params if id(p) not in encoder_params], "scale": 1.0},
                  {"params": [p for p in params if id(p) in encoder_params],
                   "scale": cfg.encoder_lr / cfg.lr[stage_id]}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr[stage_id],
                                      weight_decay=cfg.weight_decay)
        first = 0
        if resume_folder is not None:
            st = ckpt.load_step(resume_folder, model, optimizer if stage_id == start_stage and start_step else None)
            first = start_step if stage_id == start_stage else 0
            resume_folder = None
            log(f"resumed from {out / 'steps'} at stage {stage_id}, step {first}")
        loss_module = StageLoss(model, stage, builder)
        runner = loss_module
        if world > 1:
            runner = nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=True)
        bar = progress_bar(range(first, total), f"stage {stage_id} ({stage.name})", progress and rank == 0, first,
                           total)
        for step in bar:
            lr = lr_at(step, total, cfg.lr[stage_id], cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["scale"]
            chunks, counts = make_batch(cfg, stage_id, step, rank, world, builder, pad_id, model)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, parts = 0.0, {}
            for i, chunk in enumerate(chunks):
                # DDP syncs gradients once, on the last chunk's backward.
                with runner.no_sync() if world > 1 and i + 1 < len(chunks) else contextlib.nullcontext():
                    chunk_loss, chunk_parts = runner(chunk, counts)
                    (chunk_loss * world).backward()  # DDP averages gradients; the loss is a global mean share
                loss = loss + chunk_loss.detach()
                parts = {k: parts.get(k, 0.0) + v for k, v in chunk_parts.items()}
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            steps_run += 1
            total_loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total_loss)
            record = {"stage": int(stage_id), "step": step + 1, "loss": float(total_loss),
                      "lr": lr, "grad_norm": float(grad_norm), "seconds": round(time.perf_counter() - t0, 4),
                      **{k: float(v) for k, v in parts.items()}}
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            done = step + 1 == total
            if rank == 0 and (done or (step + 1) % cfg.save_every == 0):
                ckpt.save_step(out, f"{stage_id}-{step + 1:06d}", model, optimizer,
                               {"stage": stage_id, "step": step + 1, "stage_done": done, "stages": stages,
                                **({"init_from": str(init_from)} if init_from is not None else {})})
            if world > 1:
                dist.barrier()
            if stop_after is not None and steps_run >= stop_after:
                log(f"stopping after {steps_run} steps (stop_after)")
                return out
        if rank == 0:
            plot_losses(out)
    result = _finish(model, tokenizer, cfg, out, rank, judge, init_from)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _finish(model, tokenizer, cfg, out, rank, judge, init_from=None) -> Path:
    if rank == 0:
        step = ckpt.latest_step(out)
        training = {"last_step": step.name if step else None, "complete": True}
        if init_from is not None:
            training["init_from"] = str(init_from)
        ckpt.save_checkpoint(model, tokenizer, cfg, out, training=training)
        if judge and not (out / "judge.onnx").exists():
            if init_from is not None and (Path(init_from) / "judge.onnx").is_file():
                shutil.copyfile(Path(init_from) / "judge.onnx", out / "judge.onnx")  # same renders, same judge
            else:
                from emu_edge.training.judge import train_judge

                train_judge(cfg, out / "judge.onnx")
        plot_losses(out)
    return out


def progress_bar(iterable, desc, enabled, first, total):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, initial=first, total=total, dynamic_ncols=True)


def plot_losses(out: Path) -> Path | None:
    """loss.png beside metrics.jsonl: one panel per stage."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_stage: dict[int, list] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    fig, axes = plt.subplots(1, len(by_stage), figsize=(4 * len(by_stage), 3), squeeze=False)
    for ax, (stage, rs) in zip(axes[0], sorted(by_stage.items())):
        # A resumed run logs some steps twice; the latest record wins.
        last = {r["step"]: r for r in rs}
        steps = sorted(last)
        ax.plot(steps, [last[s]["loss"] for s in steps], lw=0.8)
        ax.set_title(f"stage {stage}: {STAGES[str(stage)].name}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return out / "loss.png"
