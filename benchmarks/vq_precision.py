"""Which precision pays for Emu3's VQ graphs on this machine: fp32, int8 and fp16 side by side.

    .venv/bin/python -m benchmarks.vq_precision [--threads 1] [--repeats 7] [--json FILE]

Two random Emu3VQVAEs (transformers' class): tests/tiny_models.py's "f4" VQ-VAE, and
Emu3's own architecture (channel multipliers 1, 2, 2, 4, two residual blocks per level,
attention at the last level, codebook 32768 x 4, temporal factor 4) at a quarter of its
width (base 64 channels instead of 256). Each is exported as the bundle's vq_encoder and
vq_decoder graphs are (export/vq.py), then every variant is made with the quantizer's own
functions (calibration/quantize.py):

    int8 Conv           static QDQ on Conv, u8 activations, per-channel s8 weights, minmax
                        ranges from 8 calibration images (the output Conv kept float, as
                        quantize_graph keeps output heads)
    int8 Conv+MatMul    the same on Conv and the attention MatMuls
    int8 MatMul (w8)    MatMulNBits 8-bit weights, int8 compute (accuracy level 4): the
                        dynamic-activation form, on the attention projections only
    fp16                float16 weights and compute, float32 I/O

measured on 8 other images at 64x64 and at 128x128 pixels (the decoder on the fp32
encoder's codes of those images): median ms per call over alternating rounds, and the
error against fp32 (the encoder: the fraction of codes that differ; the decoder: PSNR of
the pixels in 0..255 after the processor's postprocess, and relative error). Random
weights: the errors say how far each variant moves the numbers, not how a trained
model's images look. About 7 minutes on 2 cores; the figures decide STATIC_INT8_OPS and
NOT_INT8_BY_DEFAULT for the VQ graphs in calibration/quantize.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parent.parent
# Emu3ImageProcessor's defaults (the CLIP constants); the decoder's pixels come out in this space.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
SIDES = (64, 128)
# name -> settings over tests/tiny_models.py's "f4" VQ preset
MODELS = {
    "tiny f4": {},
    "Emu3 arch, width 64": dict(codebook_size=32768, embed_dim=4, latent_channels=4, temporal_downsample_factor=4,
                                base_channels=64, channel_multiplier=[1, 2, 2, 4], num_res_blocks=2,
                                attn_resolutions=[3], hidden_size=256, num_attention_heads=1),
}


def build(name: str):
    """A random Emu3VQVAE, eval mode, norms and codebook drawn as tiny_models.build_vq draws them."""
    sys.path.insert(0, str(_REPO / "tests"))
    from tiny_models import build_vq

    return build_vq("f4", **MODELS[name])


def images(side: int, n: int, split: str) -> list[np.ndarray]:
    """[1, 3, side, side] inputs as the processor makes them, of procedural scenes."""
    from emu_edge import data

    out = []
    for sample in data.captioning(split, n, size=side):
        image = next(s.value for s in sample.segments if s.kind == "image")
        x = image.astype(np.float32).transpose(2, 0, 1) / 255.0
        out.append(((x - MEAN) / STD)[None].astype(np.float32))
    return out


class _Samples:
    """The few calls of calibration.Calibration that quantize_graph makes."""

    def __init__(self, graph: str, samples: list[dict]):
        self.graphs, self._samples = [graph], samples

    def samples(self, graph: str, heldout: bool | None = None) -> list[dict]:
        return self._samples


def variants(graph: str, path: Path, calibration: list[dict]) -> dict:
    import onnx

    from emu_edge.calibration.quantize import QuantizeSettings, quantize_graph, weight_only

    def quantized(precision: str, settings, samples) -> onnx.ModelProto:
        # A work folder per variant: quantize_graph caches activation ranges there.
        with tempfile.TemporaryDirectory(prefix="emu-edge-vq-variant-") as work:
            model, _ = quantize_graph(graph, path, precision, settings, samples, Path(work), log=lambda *a: None)
        return model

    out = {"fp32": onnx.load(str(path))}
    for label, ops in (("int8 Conv", ("Conv",)), ("int8 Conv+MatMul", ("Conv", "MatMul"))):
        settings = QuantizeSettings(graphs={graph: "int8"}, op_types={graph: ops}, auto_exclude=False)
        out[label] = quantized("int8", settings, _Samples(graph, calibration))
    out["int8 MatMul (w8)"] = weight_only(out["fp32"], 8, QuantizeSettings(), [])
    out["fp16"] = quantized("fp16", QuantizeSettings(graphs={graph: "fp16"}), None)
    return out


def to_255(pixels: np.ndarray) -> np.ndarray:
    return np.clip((pixels * STD + MEAN) * 255.0, 0, 255)


def errors(graph: str, want: list[np.ndarray], got: list[np.ndarray]) -> dict:
    if graph == "vq_encoder":
        return {"codes_differing": round(float(np.mean([np.mean(a != b) for a, b in zip(want, got)])), 4)}
    rel = np.mean([np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in zip(want, got)])
    mse = np.mean([np.mean((to_255(a) - to_255(b)) ** 2) for a, b in zip(want, got)])
    return {"rel_error": round(float(rel), 4), "psnr_db": round(float(10 * np.log10(255.0 ** 2 / mse)), 2)
            if mse > 0 else None}


def measure(models: dict, graph: str, feeds: list[dict], threads: int, repeats: int) -> dict:
    from emu_edge.calibration import sensitivity

    sessions = {label: sensitivity.session(m, threads) for label, m in models.items()}
    outputs = {label: [s.run(None, f)[0] for f in feeds] for label, s in sessions.items()}   # and warm-up
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(repeats):
        for label, s in sessions.items():
            start = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            times[label].append((time.perf_counter() - start) * 1e3 / len(feeds))
    fp32_ms = float(np.median(times["fp32"]))
    result = {}
    for label in sessions:
        ms = float(np.median(times[label]))
        result[label] = {"ms": round(ms, 3), "speedup": round(fp32_ms / ms, 3),
                         "mb": round(len(models[label].SerializeToString()) / 1e6, 2),
                         **errors(graph, outputs["fp32"], outputs[label])}
    return result


def run(threads: int, repeats: int, log=print) -> dict:
    import onnx

    from emu_edge.calibration import sensitivity
    from emu_edge.export.vq import VQDecoderSpec, VQEncoderSpec, VQSettings

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="emu-edge-vq-precision-") as tmp:
        work = Path(tmp)
        for name in MODELS:
            vq = build(name)
            settings = VQSettings.from_config(vq.config)
            paths = {}
            for spec in (VQEncoderSpec(settings), VQDecoderSpec(settings)):
                paths[spec.role] = work / f"{name.replace(' ', '_')}_{spec.role}.onnx"
                onnx.save(spec.build(vq), str(paths[spec.role]))
            encoder = onnx.load(str(paths["vq_encoder"]))
            log(f"{name}: spatial factor {settings.spatial_factor}, "
                f"{sum(p.numel() for p in vq.parameters()) / 1e6:.1f}M parameters, "
                f"ops {sorted({n.op_type for n in encoder.graph.node if n.op_type in ('Conv', 'MatMul')})}")
            fp32_encoder = sensitivity.session(str(paths["vq_encoder"]), threads)
            for side in SIDES:
                calib = [{"pixel_values": x} for x in images(side, 8, "val")]
                test = [{"pixel_values": x} for x in images(side, 8, "test")]

                def codes_of(feeds):
                    return [{"codes": fp32_encoder.run(None, f)[0]} for f in feeds]

                samples = {"vq_encoder": (calib, test), "vq_decoder": (codes_of(calib), codes_of(test))}
                for graph, (cal, held) in samples.items():
                    start = time.perf_counter()
                    models = variants(graph, paths[graph], cal)
                    key = f"{name} | {graph} | {side}x{side}"
                    results[key] = measure(models, graph, held, threads, repeats)
                    log(f"  {key}: measured in {time.perf_counter() - start:.0f} s")
    return results


def format_results(results: dict) -> str:
    lines = []
    for key, variants_ in results.items():
        lines.append(key)
        for label, r in variants_.items():
            err = (f"codes differing {r['codes_differing']:.4f}" if "codes_differing" in r else
                   f"rel_error {r['rel_error']:.4f}, PSNR {r['psnr_db'] if r['psnr_db'] is not None else 'inf'} dB")
            lines.append(f"  {label:<18}{r['ms']:>9.2f} ms {r['speedup']:>6.2f}x {r['mb']:>7.2f} MB   {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args.threads, args.repeats)
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
