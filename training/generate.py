"""PyTorch reference loops: greedy text with a KV cache, embedding regression, and the
U-Net denoising loop. The eval uses them, and the runtime's parity tests compare against them."""

from __future__ import annotations

import numpy as np
import torch

from emu_edge.runtime.prompt import EOS, Encoded, PromptBuilder
from emu_edge.runtime.schedulers import initial_noise
from emu_edge.training.batching import to_pixels


def _visuals(model, enc: Encoded) -> torch.Tensor | None:
    cfg = model.cfg
    parts = []
    for kind, value in enc.visuals:
        if kind == "image":
            parts.append(model.encoder(to_pixels(np.asarray(value)[None]), cfg.n_query)[0])
        else:
            parts.append(model.encoder(to_pixels(np.asarray(value)), cfg.frame_n_query).flatten(0, 1))
    return torch.cat(parts) if parts else None


@torch.no_grad()
def prefill(model, enc: Encoded):
    """Run the prompt; returns (logits [V], regressed [D], past key values)."""
    from transformers import DynamicCache

    ids = torch.tensor([enc.ids])
    embeds = model.embed(ids, _visuals(model, enc))
    cache = DynamicCache()
    logits, regressed, _ = model.decode(embeds, past_key_values=cache, use_cache=True)
    return logits[0, -1], regressed[0, -1], cache


@torch.no_grad()
def step(model, embeds: torch.Tensor, cache):
    logits, regressed, _ = model.decode(embeds, past_key_values=cache, use_cache=True)
    return logits[0, -1], regressed[0, -1]


@torch.no_grad()
def greedy_ids(model, enc: Encoded, max_new_tokens: int = 32) -> list[int]:
    eos = model.token_ids[EOS]
    logits, _, cache = prefill(model, enc)
    out = []
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok == eos:
            break
        out.append(tok)
        logits, _ = step(model, model.embed(torch.tensor([[tok]]), None), cache)
    return out


def greedy_text(model, tokenizer, builder: PromptBuilder, task: str, segments, max_new_tokens: int = 32) -> str:
    enc = builder.encode(task, segments, generate="text")
    return tokenizer.decode(greedy_ids(model, enc, max_new_tokens), skip_special_tokens=True).strip()


@torch.no_grad()
def regress(model, builder: PromptBuilder, task: str, segments) -> torch.Tensor:
    """[IMG] then N decode steps, each regressed embedding fed back through project_up
    (as an <image> token). Returns [N, visual_dim]."""
    enc = builder.encode(task, segments, generate="image")
    _, reg, cache = prefill(model, enc)
    image_id = torch.tensor([[model.token_ids["<image>"]]])
    out = [reg]
    for _ in range(model.cfg.n_query - 1):
        _, reg = step(model, model.embed(image_id, reg[None]), cache)
        out.append(reg)
    return torch.stack(out)


@torch.no_grad()
def sample_images(model, cond: torch.Tensor, steps: int = 25, guidance: float = 3.0, seed: int = 0,
                  scheduler: str = "ddim") -> np.ndarray:
    """cond [B, N, D] -> uint8 [B, H, W, 3]. Conditional and unconditional (zeros) branches
    run in one batched U-Net call per step."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler}
    sched = classes[scheduler].from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    b, size = cond.shape[0], model.cfg.image_size
    # numpy draws the starting noise, as the runtime does, so one seed gives one image on both.
    x = torch.from_numpy(initial_noise(seed, (b, 3, size, size))) * sched.init_noise_sigma
    both = torch.cat([cond, torch.zeros_like(cond)])
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps = model.unet(inp, t.float().expand(2 * b), encoder_hidden_states=both).sample
        cond_eps, uncond_eps = eps.chunk(2)
        x = sched.step(uncond_eps + guidance * (cond_eps - uncond_eps), t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def autoencode(model, images: np.ndarray, **kwargs) -> np.ndarray:
    cond = model.encoder(to_pixels(images), model.cfg.n_query)
    return sample_images(model, cond, **kwargs)
