"""emu3's stage 0: the VQ-VAE that turns a 64 x 64 image into 8 x 8 codes.

Loss: MSE reconstruction + beta * commitment, straight-through to the encoder; the codebook
follows its EMA averages and dead codes restart at encoder outputs (training/vq.py). As in
the emu2 stages, every batch (and every restart) is a pure function of (seed, step), so
`--resume` ends with the weights of an uninterrupted run.

    out/vq/         Emu3VQVAE.save_pretrained + the Emu3ImageProcessor it is trained for
    out/judge.onnx  the judge at the VQ's image size (trained on ground-truth renders only)
    out/steps/ metrics.jsonl loss.png train_config.json
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from emu_edge import data
from emu_edge.training import checkpoint as ckpt
from emu_edge.training.batching import image_of
from emu_edge.training.config import VQConfig
from emu_edge.training.train import check_same_stream, claim, lr_at, progress_bar
from emu_edge.training.vq import VQTrainer, build_vq, image_processor, to_pixels, unit_range

STAGE = "0"
FAMILY = "emu3"


def vq_images(cfg: VQConfig, split: str, first: int, n: int) -> np.ndarray:
    """Images #first..first+n-1 of the split's stream: uint8 [n, S, S, 3]."""
    return np.stack([image_of(data.mixture(cfg.tasks, split, first + i, seed=cfg.seed, size=cfg.image_size))
                     for i in range(n)])


def step_generator(cfg: VQConfig, step: int) -> torch.Generator:
    """The codebook's randomness (its start and restarts) at a step."""
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + 7) * 1_000_003 + step)


def psnr(recon: torch.Tensor, target: torch.Tensor, processor) -> torch.Tensor:
    """Per image, in dB, on [0, 1] pixels (the reconstruction clipped as it is when shown)."""
    err = (unit_range(recon, processor).clamp(0, 1) - unit_range(target, processor)).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(1 / err.clamp(min=1e-10))


def check_family(folder: Path, out: Path) -> None:
    """The step folder being resumed in `out` belongs to an emu3 run (either stage)."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("family") != FAMILY:
        raise ckpt.CheckpointError(f"--resume: {out} holds an emu2 run; resume it without --family emu3, or "
                                   "choose another --out")


def train_vq(cfg: VQConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None, progress: bool = True, judge: bool = True, log=print) -> Path:
    """Train the VQ-VAE into `out`. stop_after: end (as if killed) after that many steps in
    this call, to test resuming."""
    out = Path(out)
    claim(out, resume, overwrite, None, 0, 1, log)
    out.mkdir(parents=True, exist_ok=True)
    folder = ckpt.latest_step(out) if resume else None
    if resume and folder is None:
        raise ckpt.CheckpointError(f"--resume: nothing to resume in {out} (no steps/latest.json); "
                                   "start without --resume")
    torch.manual_seed(cfg.seed)
    trainer = VQTrainer(build_vq(cfg), cfg)
    # eval mode throughout: the only layers that differ are the temporal stacks' BatchNorm3d,
    # and batch statistics would make an image's codes depend on the rest of its batch and
    # differ from the running statistics the exporter uses.
    trainer.eval()
    params = trainer.trainable()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    processor = image_processor(cfg)
    first = 0
    if folder is not None:
        check_family(folder, out)
        check_same_stream(cfg, out)
        first = ckpt.load_step(folder, trainer, optimizer)["step"]
        log(f"resumed from {folder} at step {first}")
    else:
        (out / "train_config.json").write_text(cfg.dumps())
        log(f"VQ-VAE: {sum(p.numel() for p in trainer.vq.parameters()) / 1e6:.2f}M parameters, "
            f"{cfg.image_size} px -> {cfg.image_size // cfg.spatial_factor}^2 codes of {cfg.codebook_size}")

    metrics = (out / "metrics.jsonl").open("a")
    bar = progress_bar(range(first, cfg.steps), "emu3 stage 0 (VQ-VAE)", progress, first, cfg.steps)
    for steps_run, step in enumerate(bar, 1):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels = to_pixels(vq_images(cfg, "train", step * cfg.batch_size, cfg.batch_size), processor)
        generator = step_generator(cfg, step)
        t0 = time.perf_counter()
        if not trainer.codebook.initialised:
            trainer.start_codebook(pixels, generator)
        result = trainer(pixels)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        usage = trainer.update_codebook(result, step, generator)
        record = {"stage": int(STAGE), "step": step + 1, "loss": float(result.loss.detach()), **result.parts, **usage,
                  "psnr": float(psnr(result.recon, pixels, processor).mean()), "lr": lr,
                  "grad_norm": float(grad_norm), "seconds": round(time.perf_counter() - t0, 4)}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.4f}", ppl=f"{usage['perplexity']:.0f}",
                            psnr=f"{record['psnr']:.1f}")
        done = step + 1 == cfg.steps
        if done or (step + 1) % cfg.save_every == 0:
            ckpt.save_step(out, f"{STAGE}-{step + 1:06d}", trainer, optimizer,
                           {"family": FAMILY, "stage": STAGE, "step": step + 1, "stage_done": done})
        if stop_after is not None and steps_run >= stop_after:
            log(f"stopping after {steps_run} steps (stop_after)")
            metrics.close()
            return out
    metrics.close()
    if folder is not None and first >= cfg.steps:
        log(f"--resume: {out} already finished its {cfg.steps} steps")
    save_vq(trainer.vq, processor, out / "vq")
    if judge and not (out / "judge.onnx").exists():
        from emu_edge.training.judge import train_judge

        train_judge(cfg, out / "judge.onnx", steps=cfg.judge_steps, log=log)
    plot_vq(out)
    return out


def save_vq(vq, processor, folder: Path) -> Path:
    """Emu3VQVAE.save_pretrained and its image processor, written beside and swapped in."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vq.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    ckpt.replace_dir(tmp, folder)
    return folder


def plot_vq(out: Path) -> Path | None:
    """loss.png beside metrics.jsonl: stage 0's losses, codebook usage and PSNR, and the
    decoder stage's losses where the run has reached it."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A resumed run logs some steps twice; the latest record wins.
    last: dict[int, dict[int, dict]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        last.setdefault(r.get("stage", 0), {})[r["step"]] = r
    panels = []   # (title, stage, keys, log scale)
    if 0 in last:
        panels += [("VQ-VAE losses", 0, ("loss", "recon", "commit"), True),
                   ("codebook", 0, ("perplexity", "codes_used", "dead_codes"), False),
                   ("PSNR (dB)", 0, ("psnr",), False)]
    if 1 in last:
        panels += [("decoder losses", 1, ("loss", "ce_text", "ce_image"), True)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (title, stage, keys, log) in zip(axes[0], panels):
        steps = sorted(last[stage])
        for key in keys:
            points = [(s, last[stage][s][key]) for s in steps if last[stage][s].get(key) is not None]
            if points:
                ax.plot(*zip(*points), lw=0.8, label=key)
        if log:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return out / "loss.png"
