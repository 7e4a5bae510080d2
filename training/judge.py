"""The judge: a small CNN trained only on ground-truth renders, shipped as judge.onnx.

It names the colour and shape of a one-object image and the digit of a handwritten digit,
and exposes its penultimate features, so that evaluation and quantization reports can
score generated images torch-free (the analogue of Emu2's CLIP-T and CLIP-I).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emu_edge import data
from emu_edge.training.config import EmuConfig, VQConfig


class JudgeNet(nn.Module):
    def __init__(self, n_colours: int, n_shapes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 128), nn.ReLU(),
        )
        self.colour = nn.Linear(128, n_colours)
        self.shape = nn.Linear(128, n_shapes)
        self.digit = nn.Linear(128, 10)

    def forward(self, images):  # images: [B, 3, H, W] in [0, 1]
        f = self.body(images)
        return self.colour(f), self.shape(f), self.digit(f), f


def judge_batch(rng: np.random.Generator, split: str, n: int, size: int):
    """Half one-object scenes (colour, shape labels), half digits (digit label); -1 = no label."""
    images, colours, shapes, digits = [], [], [], []
    names_c, names_s = list(data.COLOURS), list(data.SHAPES)
    digit_pool = data.digit_split_indices(split)
    for i in range(n):
        if i % 2 == 0:
            while True:
                scene = data.random_scene(rng, 1)
                if data.scene_split(scene) == split:
                    break
            obj = scene.objects[0]
            images.append(data.render(scene, size))
            colours.append(names_c.index(obj.colour))
            shapes.append(names_s.index(obj.shape))
            digits.append(-1)
        else:
            idx = int(rng.choice(digit_pool))
            images.append(data.digit_image(idx, size))
            colours.append(-1)
            shapes.append(-1)
            digits.append(data.digit_label(idx))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(colours), torch.tensor(shapes), torch.tensor(digits)


def judge_accuracy(net: JudgeNet, x, c, s, d) -> float:
    with torch.no_grad():
        lc, ls, ld, _ = net(x)
    obj = c >= 0
    ok_obj = (lc.argmax(1) == c) & (ls.argmax(1) == s)
    ok_dig = ld.argmax(1) == d
    return float(torch.where(obj, ok_obj, ok_dig).float().mean())


def train_judge(cfg: EmuConfig | VQConfig, out: str | Path, steps: int | None = None, seed: int = 0,
                log=print) -> float:
    """Train on train-split renders at the model's image size, report accuracy on the val split,
    export to ONNX."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = JudgeNet(len(data.COLOURS), len(data.SHAPES))
    steps = steps if steps is not None else (1500 if cfg.image_size >= 32 else 150)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        x, c, s, d = judge_batch(rng, "train", 64, cfg.image_size)
        # Generated images are not clean renders: noise and blur keep the judge from
        # depending on pixel-perfect edges.
        x = (x + torch.randn_like(x) * float(rng.uniform(0, 0.08))).clamp(0, 1)
        if rng.random() < 0.3:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        lc, ls, ld, _ = net(x)
        loss = (F.cross_entropy(lc, c, ignore_index=-1) + F.cross_entropy(ls, s, ignore_index=-1)
                + F.cross_entropy(ld, d, ignore_index=-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    acc = judge_accuracy(net, *judge_batch(np.random.default_rng(seed + 1), "val", 400, cfg.image_size))
    log(f"judge: {steps} steps, val accuracy {acc:.3f}")
    export_judge(net, cfg.image_size, out)
    return acc


def export_judge(net: JudgeNet, size: int, out: str | Path) -> Path:
    import onnx

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.onnx.export(
        net, (torch.rand(2, 3, size, size),), str(tmp), dynamo=False, opset_version=17,
        input_names=["images"], output_names=["colour_logits", "shape_logits", "digit_logits", "features"],
        dynamic_axes={"images": {0: "batch"}, **{k: {0: "batch"} for k in
                      ("colour_logits", "shape_logits", "digit_logits", "features")}},
    )
    model = onnx.load(str(tmp))
    model.ir_version = 8  # onnxruntime 1.16+ reads it
    # The label names travel with the graph, so the judge is self-describing.
    labels = {"colours": list(data.COLOURS), "shapes": list(data.SHAPES), "digits": list(data.DIGIT_WORDS),
              "image_size": size, "input": "RGB in [0, 1], NCHW"}
    onnx.helper.set_model_props(model, {"emu_edge.judge": json.dumps(labels)})
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return out
