"""`emu-edge eval RUN --family emu3`: the VQ-VAE's round trip on held-out images.

Each image goes through transformers' own Emu3VQVAE.encode and .decode (what the exporter
traces), is turned back into an image as Emu3ImageProcessor.postprocess does, and the run's
judge.onnx reads it: colour and shape of one-object scenes, the digit of handwritten digits
(as `judge_accuracy` reads the originals). Two-object scenes, which the judge cannot read,
count towards PSNR and codebook usage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emu_edge import data
from emu_edge.runtime.judge import Judge, attribute_hits
from emu_edge.training.checkpoint import CheckpointError
from emu_edge.training.vq import perplexity, to_images, to_pixels

# Test-split sizes: one-object scenes, handwritten digits, two-object scenes.
SIZES = {"objects": 200, "digits": 180, "scenes": 100}


def load_vq(path: Path):
    """(Emu3VQVAE in fp32 eval mode, its Emu3ImageProcessor) of a run's vq/ folder."""
    from transformers import Emu3ImageProcessor, Emu3VQVAE

    folder = path / "vq"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint file missing: {folder / name}; a run writes vq/ when it finishes "
                                  "(emu-edge train --family emu3 --resume completes an interrupted one)")
    try:
        return Emu3VQVAE.from_pretrained(folder).float().eval(), Emu3ImageProcessor.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for a bad folder
        raise CheckpointError(f"cannot load {folder} with Emu3VQVAE.from_pretrained: {e}") from e


@torch.no_grad()
def round_trip(vq, processor, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 3] -> (their codes [N, S/f, S/f], the decoded images uint8 [N, S, S, 3])."""
    codes, decoded = [], []
    for i in range(0, len(images), batch):
        pixels = to_pixels(images[i:i + batch], processor)
        sizes = torch.tensor([pixels.shape[-2:]] * len(pixels))
        tokens = torch.stack(vq.encode(pixels, image_sizes=sizes).image_tokens)
        codes.append(tokens.numpy())
        decoded.append(to_images(vq.decode(tokens), processor))
    return np.concatenate(codes), np.concatenate(decoded)


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    err = ((a.astype(np.float64) - b.astype(np.float64)) / 255).__pow__(2).mean((1, 2, 3))
    return 10 * np.log10(1 / np.maximum(err, 1e-10))


def evaluate_vq(path: str | Path, split: str = "test", scale: float = 1.0, log=print) -> dict:
    path = Path(path)
    judge_file = path / "judge.onnx"
    if not judge_file.is_file():
        raise CheckpointError(f"checkpoint file missing: {judge_file}")
    vq, processor = load_vq(path)
    judge = Judge(judge_file)
    size = judge.image_size  # the judge was trained at the VQ's image size
    n = {k: max(4, int(v * scale)) for k, v in SIZES.items()}
    scenes = data.captioning(split, 6 * max(n["objects"], n["scenes"]), size=size)
    objects = data.one_object(scenes, n["objects"])
    pairs = [s for s in scenes if len(s.meta["scene"].objects) == 2][:n["scenes"]]
    digits = data.digits(split, n["digits"], size=size)
    kinds = {"objects": objects, "digits": digits, "scenes": pairs}
    originals = {k: np.stack([s.segments[0].value for s in v]) for k, v in kinds.items()}
    codes, decoded = {}, {}
    for kind, images in originals.items():
        codes[kind], decoded[kind] = round_trip(vq, processor, images)
        log(f"  {kind}: {len(images)} images")

    want = [(s.meta["scene"].objects[0].colour, s.meta["scene"].objects[0].shape) for s in objects]
    want_digits = [data.DIGIT_WORDS[s.meta["digit"]] for s in digits]

    def read(images_by_kind) -> tuple[list[bool], dict, np.ndarray]:
        """The judge on one-object scenes and digits: hits (as judge_accuracy), the object
        breakdown, and its features."""
        v_obj, v_dig = judge(images_by_kind["objects"]), judge(images_by_kind["digits"])
        got = list(zip(v_obj["colour"], v_obj["shape"]))
        hits = [g == w for g, w in zip(got, want)] + [d == w for d, w in zip(v_dig["digit"], want_digits)]
        breakdown = {**attribute_hits(got, want),
                     "digits": float(np.mean([d == w for d, w in zip(v_dig["digit"], want_digits)]))}
        return hits, breakdown, np.concatenate([v_obj["features"], v_dig["features"]])

    hits, breakdown, features = read(decoded)
    truth_hits, truth_breakdown, truth_features = read(originals)
    psnr = {k: float(_psnr(decoded[k], originals[k]).mean()) for k in kinds}
    all_codes = np.concatenate([c.reshape(-1) for c in codes.values()])
    counts = torch.bincount(torch.from_numpy(all_codes), minlength=vq.config.codebook_size)
    results = {
        "reconstruction_accuracy": float(np.mean(hits)),
        "judge_accuracy": float(np.mean(truth_hits)),  # on the originals: the ceiling
        "reconstruction_similarity": float(np.mean(Judge.cosine(features, truth_features))),
        "psnr": float(np.mean(np.concatenate([_psnr(decoded[k], originals[k]) for k in kinds]))),
        "perplexity": perplexity(counts),
        "codes_used": int((counts > 0).sum()),
        "dead_codes": int((counts == 0).sum()),
    }
    log(f"  reconstruction accuracy {results['reconstruction_accuracy']:.3f} (judge on the originals "
        f"{results['judge_accuracy']:.3f}), PSNR {results['psnr']:.2f} dB, perplexity {results['perplexity']:.1f}, "
        f"{results['codes_used']} of {vq.config.codebook_size} codes used")
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    out["breakdown"] = {
        "reconstruction": {k: round(v, 4) for k, v in breakdown.items()},
        "originals": {k: round(v, 4) for k, v in truth_breakdown.items()},
        "psnr": {k: round(v, 4) for k, v in psnr.items()},
    }
    out["samples"] = {k: len(v) for k, v in kinds.items()}
    out["codebook_size"] = vq.config.codebook_size
    out["image_size"] = size
    out["split"] = split
    return out
