"""An emu2 checkpoint on the held-out test split, scored deterministically (`emu-edge eval`).

Text tasks are exact matches of greedy answers. Generated images are scored by the
checkpoint's judge.onnx (torch-free), which also gives the shuffled-prompt baseline: what a
generator ignoring its prompt would score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from emu_edge import data
from emu_edge.runtime.judge import Judge, attribute_hits, mean_by, prompt_following
from emu_edge.runtime.prompt import emu2_builder
from emu_edge.training import generate as gen
from emu_edge.training.checkpoint import CheckpointError, load_checkpoint
from emu_edge.training.tokenizer import encode_text_fn

# Test-split sizes per metric (the tiny preset scales them down).
SIZES = {"captioning": 200, "vqa": 200, "digits": 181, "video": 100, "fewshot": 100, "chat": 100,
         "text_to_image": 64, "subject": 48, "judge": 400, "autoencode": 32}


def _split_answer(sample):
    """(segments before the last answer, the last answer)."""
    segs = [(s.kind, s.value) for s in sample.segments]
    last = max(i for i, (k, _) in enumerate(segs) if k == "answer")
    return segs[:last], segs[last][1]


def evaluate(path: str | Path, scale: float = 1.0, log=print, steps: int | None = None,
             guidance: float | None = None, split: str = "test", only: list[str] | None = None) -> dict:
    """The metrics of issue 2 on `split` (val is for tuning generation settings, test for
    reporting). steps/guidance default to the checkpoint's generation defaults. only: the
    SIZES keys to score (default all); a metric's figures do not depend on what else runs."""
    unknown = sorted(set(only or ()) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; choose from {', '.join(SIZES)}")
    run = set(only or SIZES)
    torch.manual_seed(0)
    model, tokenizer, cfg = load_checkpoint(path)
    defaults = json.loads((Path(path) / "emu.json").read_text())["generation_defaults"]
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance"] if guidance is None else guidance
    judge_file = Path(path) / "judge.onnx"
    if not judge_file.exists():
        raise CheckpointError(f"checkpoint file missing: {judge_file}")
    judge = Judge(judge_file)
    builder = emu2_builder(model.token_ids, encode_text_fn(tokenizer), cfg.n_query, cfg.frame_n_query)
    n = {k: max(4, int(v * scale)) for k, v in SIZES.items() if k in run}
    size = cfg.image_size
    results: dict[str, float | int] = {}

    breakdown: dict[str, dict[str, float]] = {}

    def text_hits(task: str, samples, correct=lambda got, want: got == want) -> list[bool]:
        hits = []
        for s in samples:
            prompt, want = _split_answer(s)
            hits.append(bool(correct(gen.greedy_text(model, tokenizer, builder, s.task, prompt), want)))
        log(f"  {task}: {sum(hits)}/{len(samples)}")
        return hits

    def text_accuracy(task: str, samples, correct=lambda got, want: got == want) -> float:
        return float(np.mean(text_hits(task, samples, correct)))

    log("text tasks")
    if "captioning" in run:
        results["caption_accuracy"] = text_accuracy("captioning", data.captioning(split, n["captioning"], size=size))
    if "vqa" in run:
        vqa = data.vqa(split, n["vqa"], size=size)
        hits = text_hits("vqa", vqa)
        results["vqa_accuracy"] = float(np.mean(hits))
        breakdown["vqa_by_question"] = mean_by([s.meta["question_type"] for s in vqa], hits)
        breakdown["vqa_by_objects"] = mean_by(
            ["one object" if len(s.meta["scene"].objects) == 1 else "two objects" for s in vqa], hits)
    if "digits" in run:
        # A digit counts when the caption names the right digit (its last word).
        results["digit_accuracy"] = text_accuracy(
            "digits", data.digits(split, n["digits"], size=size),
            correct=lambda got, want: got.split()[-1:] == want.split()[-1:])
    if "video" in run:
        results["video_accuracy"] = text_accuracy("video", data.video(split, n["video"], size=size))
    if "fewshot" in run:
        results["fewshot_accuracy"] = text_accuracy("fewshot", data.fewshot(split, n["fewshot"], size=size))
    if "chat" in run:
        # Every turn is scored, with the true earlier turns as its history.
        turns = []
        for s in data.chat(split, n["chat"], size=size):
            for i, seg in enumerate(s.segments):
                if seg.kind == "answer":
                    turns.append(data.Sample(s.task, s.segments[: i + 1], s.meta))
        results["chat_accuracy"] = text_accuracy("chat", turns)

    log("images")
    sample_kw = dict(steps=steps, guidance=guidance, seed=0, scheduler="ddim")
    if "text_to_image" in run:
        t2i = data.one_object(data.text_to_image(split, 4 * n["text_to_image"], size=size), n["text_to_image"])
        cond = torch.stack([gen.regress(model, builder, s.task, [(k.kind, k.value) for k in s.segments
                                                                   if k.kind == "text"]) for s in t2i])
        verdict = judge(gen.sample_images(model, cond, **sample_kw))
        breakdown["t2i"], baseline = prompt_following(verdict, [(s.meta["colour"], s.meta["shape"]) for s in t2i])
        results["t2i_attribute_accuracy"] = breakdown["t2i"]["both"]
        results["t2i_shuffled_baseline"] = baseline
        log(f"  text-to-image: {results['t2i_attribute_accuracy']:.3f} "
            f"(shuffled prompts {results['t2i_shuffled_baseline']:.3f})")

    if "subject" in run:
        subj = data.subject(split, n["subject"], size=size)
        cond = torch.stack([gen.regress(model, builder, s.task, [(k.kind, k.value) for k in s.segments
                                                                   if k.kind != "target_image"]) for s in subj])
        verdict = judge(gen.sample_images(model, cond, **sample_kw))
        results["subject_accuracy"] = float(np.mean([
            (c, sh) == (s.meta["target"]["colour"], s.meta["target"]["shape"])
            for c, sh, s in zip(verdict["colour"], verdict["shape"], subj)]))
        log(f"  subject-driven: {results['subject_accuracy']:.3f}")

    if "judge" in run:
        # The judge on held-out ground truth: one-object renders and test digits.
        truth = data.one_object(data.text_to_image(split, 4 * n["judge"], size=size), n["judge"] // 2)
        digits = data.digits(split, n["judge"] // 2, size=size)
        v_obj = judge(np.stack([s.segments[-1].value for s in truth]))
        v_dig = judge(np.stack([s.segments[0].value for s in digits]))
        hits = [(c, sh) == (s.meta["colour"], s.meta["shape"])
                for c, sh, s in zip(v_obj["colour"], v_obj["shape"], truth)]
        hits += [d == data.DIGIT_WORDS[s.meta["digit"]] for d, s in zip(v_dig["digit"], digits)]
        results["judge_accuracy"] = float(np.mean(hits))
        log(f"  judge: {results['judge_accuracy']:.3f}")

    if "autoencode" in run:
        scenes = data.one_object(data.captioning(split, 4 * n["autoencode"], size=size), n["autoencode"])
        originals = np.stack([s.segments[0].value for s in scenes])
        recon = judge(gen.autoencode(model, originals, **sample_kw))
        results["autoencode_similarity"] = float(np.mean(Judge.cosine(judge(originals)["features"],
                                                                      recon["features"])))
        # The U-Net's ceiling for text-to-image: attributes kept when it decodes true embeddings.
        breakdown["autoencode"] = attribute_hits(
            list(zip(recon["colour"], recon["shape"])),
            [(s.meta["scene"].objects[0].colour, s.meta["scene"].objects[0].shape) for s in scenes])
        log(f"  autoencode similarity: {results['autoencode_similarity']:.3f}")

    out = {k: round(v, 4) for k, v in results.items()}
    out["breakdown"] = {k: {name: round(v, 4) for name, v in d.items()} for k, d in breakdown.items()}
    out["samples"] = {k: v for k, v in n.items()}
    out["generation"] = sample_kw
    out["split"] = split
    return out
