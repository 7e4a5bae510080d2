"""emu3's stage 1: the decoder, transformers' Emu3ForConditionalGeneration, trained on the
data's tasks in Emu3's formats (training/emu3_format.py) over stage 0's frozen VQ-VAE.

Each image is turned into codes once (a CodeCache), so a step runs only the text model:
the sequences hold the visual ids Emu3ForConditionalGeneration itself puts where the
processor writes <image>. The loss is cross-entropy on answers and generated images, each
sample's mean counted once (an image's 75 tokens do not drown a one-word answer). As in
the other stages, every batch is a pure function of (seed, step), so `--resume` ends with
the weights of an uninterrupted run.

    out/config.json, model.safetensors, generation_config.json, tokenizer.json,
        tokenizer_config.json, processor_config.json   the Emu3ForConditionalGeneration folder
                                                       (from_pretrained, Emu3Processor, export-hf)
    out/vq/ judge.onnx                                 stage 0's, read here
    out/steps/ metrics.jsonl loss.png decoder_config.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emu_edge import data
from emu_edge.training import checkpoint as ckpt
from emu_edge.training.batching import length_chunks
from emu_edge.training.config import Emu3Config
from emu_edge.training.emu3_format import PROCESSOR_TOKENS, CodeCache, Emu3Format, TokenIds, build_tokenizer
from emu_edge.training.train import check_same_stream, claim, lr_at, progress_bar

STAGE = "1"
FAMILY = "emu3"
CONFIG_FILE = "decoder_config.json"
# What the finished stage writes into the run folder beside stage 0's vq/ and judge.onnx.
FOLDER_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json")


def load_stage0(out: Path):
    """(Emu3VQVAE, its Emu3ImageProcessor, the image side in pixels) from stage 0's vq/."""
    from emu_edge.training.evaluate_vq import load_vq

    try:
        vq, processor = load_vq(out)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"the decoder stage reads stage 0's VQ-VAE: {e}; run stage 0 first "
                                   f"(emu-edge train --family emu3 --stages 0 --out {out})") from e
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq, processor, round(math.sqrt(processor.min_pixels))


def build_model(cfg: Emu3Config, vq, tok, ids: TokenIds):
    """A fresh Emu3ForConditionalGeneration (from torch's current RNG state) holding the
    trained VQ-VAE; vocabulary_map is the tokenizer's, so the class maps codes as we do."""
    from transformers import Emu3Config as HFEmu3Config
    from transformers import Emu3ForConditionalGeneration

    config = HFEmu3Config(text_config=cfg.text_config(tok.get_vocab_size(), ids.as_dict()),
                          vq_config=vq.config.to_dict(), vocabulary_map=tok.get_vocab())
    config.architectures = ["Emu3ForConditionalGeneration"]
    model = Emu3ForConditionalGeneration(config)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.vqmodel.requires_grad_(False)
    return model


class DecoderLoss(nn.Module):
    """The model; forward is the loss of one chunk of sequences."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, ids, mask, targets, kinds, n_global: int):
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view_as(targets)
        counted = (targets != -100).sum(1).clamp(min=1)
        per_sample = ce.sum(1) / counted                               # [B]
        parts = {kind: per_sample[torch.tensor([k == kind for k in kinds])].detach() for kind in ("text", "image")}
        # A share of the global batch's mean, so the chunks' gradients sum to one batch's.
        return per_sample.sum() / n_global, parts


def collate(seqs, pad_id: int):
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    targets = torch.full((len(seqs), length), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s.ids)] = torch.tensor(s.ids)
        mask[row, :len(s.ids)] = 1
        targets[row, :len(s.ids)] = torch.tensor(s.targets)
    return ids, mask, targets, [s.kind for s in seqs]


def global_sequences(cfg: Emu3Config, step: int, fmt: Emu3Format, codes: CodeCache, size: int):
    """The step's samples in Emu3's formats; which prompts are dropped is a function of (seed, step)."""
    first = step * cfg.batch_size
    samples = [data.mixture(cfg.tasks, "train", first + i, seed=cfg.seed, size=size) for i in range(cfg.batch_size)]
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + 11) * 1_000_003 + step)
    drop = (torch.rand(len(samples), generator=g) < cfg.cfg_drop).tolist()
    return [fmt.encode(s, codes, drop_prompt=d) for s, d in zip(samples, drop)]


def load_source(checkpoint: Path):
    """The finished emu3 folder a run starts from (--init-from), in fp32."""
    from transformers import Emu3ForConditionalGeneration

    if not (checkpoint / "config.json").is_file():
        raise ckpt.CheckpointError(f"--init-from {checkpoint}: no config.json; give a finished emu3 folder (a run's "
                                   "or a shipped one, e.g. models/emu3-edge-small)")
    try:
        return Emu3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises several types for a bad folder
        raise ckpt.CheckpointError(f"--init-from {checkpoint}: Emu3ForConditionalGeneration cannot load it: {e}") from e


def stage0_from(source, checkpoint: Path, out: Path, log=print) -> None:
    """Stage 0 of a run that starts from a finished emu3 folder: the folder's own VQ-VAE
    (in fp32; a shipped folder's is fp16, and the decoder goes on learning its codes) and
    judge, written into `out` as vq/ and judge.onnx. A stage 0 already there (a resumed
    start) must be that VQ-VAE. source: the folder loaded (load_source)."""
    from transformers import Emu3ImageProcessor

    from emu_edge.training.evaluate_vq import load_vq
    from emu_edge.training.train_vq import save_vq

    vq = source.model.vqmodel
    if (out / "vq").is_dir():
        mine = load_vq(out)[0].state_dict()
        if mine.keys() != vq.state_dict().keys() or any(
                not torch.equal(mine[k], v) for k, v in vq.state_dict().items()):
            raise ckpt.CheckpointError(f"{out / 'vq'} is not the VQ-VAE of --init-from {checkpoint}; start the "
                                       "continuation in a new --out")
        return
    if not (checkpoint / "judge.onnx").is_file():
        raise ckpt.CheckpointError(f"--init-from {checkpoint}: no judge.onnx (a finished run and a shipped folder "
                                   "hold the judge its eval reads)")
    out.mkdir(parents=True, exist_ok=True)
    save_vq(vq, Emu3ImageProcessor.from_pretrained(checkpoint), out / "vq")
    shutil.copyfile(checkpoint / "judge.onnx", out / "judge.onnx")
    log(f"stage 0 (vq/, judge.onnx) taken from {checkpoint}")


def _init_weights(model, source, checkpoint: Path, tok, preset: str) -> None:
    if source.config.vocabulary_map != tok.get_vocab():
        raise ckpt.CheckpointError(f"--init-from {checkpoint}: its vocabulary is not the {preset} preset's")
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"--init-from {checkpoint} is not the {preset} preset's architecture: {e}") from e


def train_decoder(cfg: Emu3Config, out: str | Path, resume: bool = False, overwrite: bool = False,
                  stop_after: int | None = None, progress: bool = True, log=print,
                  init_from: str | Path | None = None) -> Path:
    """Train the decoder into `out`, which holds a finished stage 0 (vq/, judge.onnx).
    Starting it on such a folder continues that run: pass resume. stop_after: end (as if
    killed) after that many steps in this call, to test resuming. init_from: a finished
    emu3 folder whose weights (VQ-VAE, judge and decoder) the run starts from instead of a
    stage 0 and fresh weights; `--resume` continues such a run without it."""
    out = Path(out)
    if resume and init_from is not None:
        raise ckpt.CheckpointError("--resume continues the run's own steps; drop --init-from")
    claim(out, resume, overwrite, init_from, 0, 1, log)
    folder = ckpt.latest_step(out) if resume else None
    if init_from is None and resume and folder is None and (out / CONFIG_FILE).is_file():
        # Started from a folder and stopped before its first step folder: start as it did.
        init_from = json.loads((out / CONFIG_FILE).read_text()).get("init_from")
    source = None
    if init_from is not None:
        init_from = Path(init_from)
        source = load_source(init_from)
        stage0_from(source, init_from, out, log)
    if folder is not None:
        from emu_edge.training.train_vq import check_family

        check_family(folder, out)
    vq, processor, size = load_stage0(out)
    state = json.loads((folder / "state.json").read_text()) if folder is not None else {}
    continuing = state.get("stage") == STAGE
    from tokenizers import Tokenizer

    if continuing:
        check_same_stream(cfg, out, CONFIG_FILE)
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        tok = build_tokenizer(cfg.text_vocab_size, vq.config.codebook_size)
    ids = TokenIds.of(tok, vq.config.codebook_size)
    torch.manual_seed(cfg.seed)
    loss_module = DecoderLoss(build_model(cfg, vq, tok, ids))
    loss_module.eval()  # no dropout in the class; eval keeps the frozen VQ-VAE's norms fixed
    params = loss_module.trainable()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    first = 0
    if continuing:
        first = ckpt.load_step(folder, loss_module, optimizer)["step"]
        log(f"resumed from {folder} at step {first}")
    else:
        if init_from is not None:
            _init_weights(loss_module.model, source, init_from, tok, cfg.preset)
            cfg.init_from = str(init_from)
            log(f"initialised from {init_from}")
        tok.save(str(out / "tokenizer.json"))
        (out / CONFIG_FILE).write_text(cfg.dumps())
        text = sum(p.numel() for n, p in loss_module.model.named_parameters() if "vqmodel" not in n)
        frozen = sum(p.numel() for p in vq.parameters())
        log(f"decoder: {text / 1e6:.2f}M parameters (VQ-VAE {frozen / 1e6:.2f}M, frozen); vocabulary "
            f"{tok.get_vocab_size()}; {size} px images -> {size // vq.vision_spatial_factor}^2 codes")
    fmt = Emu3Format(tok, ids)
    codes = CodeCache(vq, processor)

    metrics = (out / "metrics.jsonl").open("a")
    bar = progress_bar(range(first, cfg.steps), "emu3 stage 1 (decoder)", progress, first, cfg.steps)
    for steps_run, step in enumerate(bar, 1):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seqs = global_sequences(cfg, step, fmt, codes, size)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, parts = 0.0, {"text": [], "image": []}
        for chunk in length_chunks(seqs, cfg.text_chunks):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                chunk_loss, chunk_parts = loss_module(*collate(chunk, ids.pad), n_global=len(seqs))
            chunk_loss.backward()
            loss = loss + float(chunk_loss.detach())
            for k, v in chunk_parts.items():
                parts[k] += v.tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        record = {"stage": int(STAGE), "step": step + 1, "loss": loss,
                  **{f"ce_{k}": float(np.mean(v)) if v else None for k, v in parts.items()},
                  "tokens": sum(len(s.ids) for s in seqs), "lr": lr, "grad_norm": float(grad_norm),
                  "seconds": round(time.perf_counter() - t0, 4), "images_cached": len(codes)}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", text=f"{record['ce_text'] or 0:.3f}",
                            image=f"{record['ce_image'] or 0:.3f}")
        done = step + 1 == cfg.steps
        if done or (step + 1) % cfg.save_every == 0:
            ckpt.save_step(out, f"{STAGE}-{step + 1:06d}", loss_module, optimizer,
                           {"family": FAMILY, "stage": STAGE, "step": step + 1, "stage_done": done})
        if stop_after is not None and steps_run >= stop_after:
            log(f"stopping after {steps_run} steps (stop_after)")
            metrics.close()
            return out
    metrics.close()
    if continuing and first >= cfg.steps:
        log(f"--resume: {out} already finished its {cfg.steps} steps")
    save_folder(loss_module.model, tok, processor, cfg, out)
    from emu_edge.training.train_vq import plot_vq

    plot_vq(out)
    return out


def hf_tokenizer(tok):
    """The tokenizer as transformers loads it, with Emu3Processor's token attributes."""
    from transformers import PreTrainedTokenizerFast

    from emu_edge.training.emu3_format import BOS, EOS, PAD

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=dict(PROCESSOR_TOKENS))


def generation_config(cfg: Emu3Config, ids: TokenIds):
    from transformers import GenerationConfig

    # negative_prompt: the prompt the unconditional branch was trained on (the runtime reads it).
    # top_k 1 is greedy: transformers refuses to save a top_k without sampling.
    sampling = {"do_sample": True, "top_k": cfg.top_k} if cfg.top_k != 1 else {"do_sample": False}
    return GenerationConfig(bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, **sampling,
                            guidance_scale=cfg.guidance_scale, max_new_tokens=cfg.max_new_tokens, negative_prompt="")


def save_folder(model, tok, processor, cfg: Emu3Config, out: Path, dtype=torch.float32) -> Path:
    """The Emu3ForConditionalGeneration folder's files, written beside and moved in:
    save_pretrained, the Emu3Processor (tokenizer and image processor) and, in
    processor_config.json, image_area: the pixels of a generated image (the trained size;
    Emu3Processor takes it as a call argument, the exporter from this file)."""
    from transformers import Emu3Processor

    ids = TokenIds.of(tok, model.config.vq_config.codebook_size)
    tmp = out / ".folder.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = generation_config(cfg, ids)
    model.to(dtype).save_pretrained(tmp)
    model.to(torch.float32)
    Emu3Processor(processor, hf_tokenizer(tok)).save_pretrained(tmp)
    config = json.loads((tmp / "processor_config.json").read_text())
    config["image_area"] = int(processor.min_pixels)
    (tmp / "processor_config.json").write_text(json.dumps(config, indent=2))
    for name in FOLDER_FILES:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out

