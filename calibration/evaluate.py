"""A bundle scored on the held-out split through the torch-free runtime, as users run it:
what `emu-edge eval` reports for an Emu3 folder (exported first) or for any emu3 bundle,
quantized ones included (`emu-edge eval BUNDLE --judge judge.onnx`).

Text tasks are exact matches of greedy answers (captions, VQA, digits by their last word).
Text-to-image draws one-object prompts with the bundle's generation defaults (guidance,
its negative prompt, top-k) and a fixed seed; the judge reads colour and shape, and the
same readings against shuffled prompts give the baseline. The VQ-VAE's round trip (the
bundle's vq_encoder then vq_decoder) is read as the VQ stage's eval reads it:
`reconstruction_accuracy`, and the judge features' cosine to the originals
(`autoencode_similarity`). Seeded and single-threaded: a rerun writes the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from emu_edge import data
from emu_edge.runtime.judge import Judge, attribute_hits, mean_by, prompt_following

# Split sizes per metric (--scale scales them); reconstruction: one-object scenes and digits.
SIZES = {"captioning": 200, "vqa": 200, "digits": 181, "text_to_image": 64, "judge": 400, "reconstruction": 380}
BATCH = 32  # prompts per batched decode


def _pil(images) -> list[Image.Image]:
    return [Image.fromarray(np.asarray(im)) for im in images]


def _batched(fn, items: list, size: int = BATCH) -> list:
    return [out for i in range(0, len(items), size) for out in fn(items[i:i + size])]


def check_tasks(only: list[str] | None) -> None:
    unknown = sorted(set(only or ()) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; choose from {', '.join(SIZES)}")


def evaluate_bundle(bundle: str | Path, judge: str | Path, split: str = "test", scale: float = 1.0,
                    guidance: float | None = None, only: list[str] | None = None, log=print) -> dict:
    """bundle: an emu3 bundle folder; judge: the judge.onnx of the run that trained it."""
    check_tasks(only)
    run = set(only or SIZES)
    if not Path(judge).is_file():
        raise FileNotFoundError(f"judge file missing: {judge}")
    from emu_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=1)
    family = pipe.manifest.model.family
    if family != "emu3":
        raise ValueError(f"{bundle} is an {family} bundle; this eval scores emu3 bundles "
                         "(an emu2 checkpoint is scored with `emu-edge eval CHECKPOINT`)")
    judge = Judge(judge)
    size = judge.image_size
    n = {k: max(4, int(v * scale)) for k, v in SIZES.items() if k in run}
    results, breakdown = _score(pipe, judge, split, size, n, guidance, log)
    defaults = pipe.family.image_defaults(guidance, None, None, None)
    generation = {k: defaults[k] for k in ("guidance", "top_k", "top_p", "temperature", "do_sample")}
    generation["negative_prompt"] = (pipe.manifest.model.generation or {}).get("negative_prompt", "")
    generation["seed"] = 0
    out = {k: round(v, 4) for k, v in results.items()}
    out["breakdown"] = {k: {name: round(v, 4) for name, v in d.items()} for k, d in breakdown.items()}
    out["samples"] = dict(n)
    out["generation"] = generation
    out["image_size"] = size
    out["split"] = split
    return out


def _score(pipe, judge: Judge, split: str, size: int, n: dict, guidance, log) -> tuple[dict, dict]:
    results: dict[str, float] = {}
    breakdown: dict[str, dict[str, float]] = {}

    def answers(samples, with_question: bool) -> list[str]:
        prompts = [_pil([s.segments[0].value]) + ([s.segments[1].value] if with_question else []) for s in samples]
        return _batched(lambda batch: pipe.generate_text_batch(batch, max_new_tokens=24), prompts)

    log("text tasks")
    if "captioning" in n:
        caps = data.captioning(split, n["captioning"], size=size)
        hits = [got == s.answer for got, s in zip(answers(caps, False), caps)]
        results["caption_accuracy"] = float(np.mean(hits))
        log(f"  captioning: {sum(hits)}/{len(hits)}")
    if "vqa" in n:
        vqa = data.vqa(split, n["vqa"], size=size)
        hits = [got == s.answer for got, s in zip(answers(vqa, True), vqa)]
        results["vqa_accuracy"] = float(np.mean(hits))
        breakdown["vqa_by_question"] = mean_by([s.meta["question_type"] for s in vqa], hits)
        breakdown["vqa_by_objects"] = mean_by(
            ["one object" if len(s.meta["scene"].objects) == 1 else "two objects" for s in vqa], hits)
        log(f"  vqa: {sum(hits)}/{len(hits)}")
    if "digits" in n:
        # A digit counts when the caption names the right digit (its last word), as for emu2.
        digits = data.digits(split, n["digits"], size=size)
        hits = [got.split()[-1:] == s.answer.split()[-1:] for got, s in zip(answers(digits, False), digits)]
        results["digit_accuracy"] = float(np.mean(hits))
        log(f"  digits: {sum(hits)}/{len(hits)}")

    log("images")
    if "text_to_image" in n:
        t2i = data.one_object(data.text_to_image(split, 4 * n["text_to_image"], size=size), n["text_to_image"])
        prompts = [s.segments[0].value for s in t2i]
        # One seed per prompt's row: an image does not depend on how the prompts are batched.
        images = _batched(lambda batch: pipe.generate_image_batch(
            [p for _, p in batch], guidance=guidance, seed=[(i, 1) for i, _ in batch]), list(enumerate(prompts)))
        verdict = judge(np.stack([np.asarray(im) for im in images]))
        breakdown["t2i"], baseline = prompt_following(verdict, [(s.meta["colour"], s.meta["shape"]) for s in t2i])
        results["t2i_attribute_accuracy"] = breakdown["t2i"]["both"]
        results["t2i_shuffled_baseline"] = baseline
        log(f"  text-to-image: {results['t2i_attribute_accuracy']:.3f} "
            f"(shuffled prompts {results['t2i_shuffled_baseline']:.3f})")

    objects = digits = None
    if "judge" in n or "reconstruction" in n:
        # One pool for both; each takes its own count of it (half scenes, half digits), so
        # --only judge and the full eval score the same images.
        m = max(n.get("reconstruction", 0), n.get("judge", 0))
        objects = data.one_object(data.text_to_image(split, 4 * m, size=size), m // 2 + m % 2)
        digits = data.digits(split, m // 2, size=size)
    if "judge" in n:
        m = n["judge"]
        results["judge_accuracy"] = float(np.mean(_judged(judge, objects[:m // 2 + m % 2], digits[:m // 2],
                                                          lambda images: images)[0]))
        log(f"  judge: {results['judge_accuracy']:.3f}")
    if "reconstruction" in n:
        m = n["reconstruction"]
        hits, parts, features, truth = _judged(
            judge, objects[:m // 2 + m % 2], digits[:m // 2],
            lambda images: np.stack([np.asarray(pipe.autoencode(im)) for im in _pil(images)]))
        results["reconstruction_accuracy"] = float(np.mean(hits))
        results["autoencode_similarity"] = float(np.mean(Judge.cosine(features, truth)))
        breakdown["reconstruction"] = parts
        log(f"  VQ round trip: {results['reconstruction_accuracy']:.3f} "
            f"(judge feature cosine {results['autoencode_similarity']:.3f})")
    return results, breakdown


def _judged(judge: Judge, objects, digits, transform):
    """The judge on transform(ground-truth renders): one-object scenes by colour and shape,
    digits by digit -> (hits, breakdown, features, the originals' features)."""
    originals = [np.stack([s.segments[-1].value for s in objects]), np.stack([s.segments[0].value for s in digits])]
    shown = [transform(images) for images in originals]
    v_obj, v_dig = judge(shown[0]), judge(shown[1])
    want = [(s.meta["colour"], s.meta["shape"]) for s in objects]
    got = list(zip(v_obj["colour"], v_obj["shape"]))
    digit_hits = [d == data.DIGIT_WORDS[s.meta["digit"]] for d, s in zip(v_dig["digit"], digits)]
    hits = [g == w for g, w in zip(got, want)] + digit_hits
    parts = {**attribute_hits(got, want), "digits": float(np.mean(digit_hits))}
    features = np.concatenate([v_obj["features"], v_dig["features"]])
    truth = np.concatenate([judge(images)["features"] for images in originals])
    return hits, parts, features, truth
