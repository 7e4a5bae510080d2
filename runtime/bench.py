"""`emu-edge bench [BUNDLE...] [--json FILE] [--plot FILE]`: what a bundle costs on this device.

One table per bundle, measured through the runtime's own Pipeline (the code an app runs):

    size on disk, cold load (open + verify + every graph's session), vision encoder,
    prefill per prompt length, decode per token (p50 / p90 / p99, from the generate loop)
    and tokens per second, regression of the N visual embeddings, one U-Net step with
    guidance (cond + uncond, batch 2), end-to-end caption and text-to-image, peak RSS

    emu3 bundles, instead of the emu2 rows: image generation at the bundle's default size
    and smaller squares, each with its time per image (decoder loop and VQ decode), image
    tokens per second, peak RSS and KV cache bytes

and how decode cost grows with context length and batch size, and an emu3 image's time
with its size (--plot draws them). Torch-free:
a device with only the runtime installed runs it. Side-by-side comparisons with other
runtimes live in the repository's benchmarks/ suite.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from emu_edge.cli import thread_count
from emu_edge.runtime.bundle import bundle_size

PREFILL_LENGTHS = (16, 64, 256)
CONTEXT_LENGTHS = (128, 256, 512, 1024, 2048)
BATCH_SIZES = (1, 2, 4, 8)
PROMPT = "a red circle"


def add_arguments(parser) -> None:
    parser.add_argument("bundles", nargs="*", type=Path, metavar="BUNDLE",
                        help="bundle folders to measure (default: the shipped model's bundle)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw decode latency against context length and batch "
                                                  "size to this PNG (needs matplotlib: the [bench] extra)")
    parser.add_argument("--threads", type=thread_count,
                        help="CPU threads per graph (default: onnxruntime's; capped at the CPU count)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per figure; the median is shown")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded for the per-token figures")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps end to end (default: the bundle's)")
    parser.add_argument("--quick", action="store_true", help="a fast pass: 2 repetitions, 16 tokens, "
                                                             "4 denoising steps, short contexts")


def run(args) -> int:
    if args.plot is not None:
        _check_matplotlib()
    if args.repeat < 1 or args.tokens < 2:
        print("emu-edge bench: error: --repeat must be >= 1 and --tokens >= 2", file=sys.stderr)
        return 2
    if args.quick:
        args.repeat, args.tokens, args.steps = min(args.repeat, 2), min(args.tokens, 16), args.steps or 4
    from emu_edge.runtime.backends import BackendError, import_onnxruntime

    try:
        # Imported before any clock starts, so the first bundle's cold load is not charged for it.
        ort = import_onnxruntime()
    except BackendError as e:
        print(f"emu-edge bench: error: {e}", file=sys.stderr)
        return 1
    bundles = args.bundles
    if not bundles:
        from emu_edge.runtime.shipped import default_bundle

        try:
            bundles = [default_bundle(log=lambda *a: print(*a, file=sys.stderr))]
        except (FileNotFoundError, RuntimeError) as e:
            print(f"emu-edge bench: error: {e}", file=sys.stderr)
            return 1
    results = []
    for path in bundles:
        try:
            result = measure_bundle(path, device=args.device, threads=args.threads, repeat=args.repeat,
                                    tokens=args.tokens, steps=args.steps, quick=args.quick)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"emu-edge bench: error: {path}: {e}", file=sys.stderr)
            return 1
        print(format_table(result))
        results.append(result)
    report = {"machine": machine_info(), "onnxruntime": ort.__version__, "threads": args.threads,
              "device": args.device, "repeat": args.repeat, "bundles": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


# -- measuring ------------------------------------------------------------------------------


def _median_ms(fn, repeat: int) -> dict:
    """fn() timed `repeat` times after one warm-up call: median, min and max in ms."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(min(times)), "max_ms": float(max(times))}


def _random_ids(rng, vocab: int, length: int, batch: int = 1) -> np.ndarray:
    # Ids 8.. skip the special tokens, which some bundles place first.
    return rng.integers(min(8, vocab - 1), vocab, size=(batch, length), dtype=np.int64)


def measure_bundle(path: str | Path, device: str = "cpu", threads: int | None = None, repeat: int = 7,
                   tokens: int = 128, steps: int | None = None, quick: bool = False) -> dict:
    from emu_edge.runtime.bundle import Bundle
    from emu_edge.runtime.pipeline import Pipeline

    path = Path(path)
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    bundle = Bundle.open(path, verify=True)
    pipe = Pipeline.load(bundle, device=device, threads=threads)
    for name in ("vision_encoder", "unet", "vq_encoder", "vq_decoder"):
        if bundle.has_graph(name):
            pipe.graph(name)
    load_s = time.perf_counter() - start

    m = pipe.manifest.model
    rng = np.random.default_rng(0)
    result = {
        "bundle": str(path),
        "precision": {name: g.precision for name, g in pipe.manifest.graphs.items()},
        "attention": m.kv.attention,
        "max_length": pipe.max_length,
        "size_mb": bundle_size(path) / 1e6,
        "load_s": load_s,
    }
    if m.family == "emu2":
        image = rng.integers(0, 256, size=(m.emu2.image_size, m.emu2.image_size, 3), dtype=np.uint8)
        result["vision_encoder"] = _median_ms(lambda: pipe.encode_visuals([("image", image)]), repeat)

    session = pipe.session(1)
    lengths = [n for n in PREFILL_LENGTHS if n + tokens <= pipe.max_length] or [min(16, pipe.max_length // 2)]
    result["prefill"] = {}
    for n in lengths:
        ids = _random_ids(rng, m.vocab_size, n)
        result["prefill"][str(n)] = _median_ms(lambda: session.prefill(ids.tolist()), repeat)

    result["decode"] = measure_decode(pipe, rng, min(tokens, pipe.max_length - lengths[0]), repeat, lengths[0])
    if m.family == "emu2":
        encoded = pipe.encode_items([PROMPT], "image")
        result["regression"] = {"n": m.emu2.n_query, **_median_ms(lambda: pipe.regress([encoded]), repeat)}
        result["unet_step"] = measure_unet_step(pipe, rng, repeat)
        result["caption"] = measure_caption(pipe, image, repeat)
        steps = steps or (m.generation or {}).get("steps", 25)
        result["text_to_image"] = {"steps": steps, **_median_ms(
            lambda: pipe.generate_image([PROMPT], steps=steps, seed=0), max(1, repeat // 2))}
    if m.family == "emu3":
        result["image_generation"] = measure_emu3_images(pipe, max(1, repeat // 2), quick)
    result["scaling"] = measure_scaling(pipe, rng, repeat=max(1, repeat // 2), quick=quick)
    peaks = [peak_rss_mb()]
    if "image_generation" in result:
        images = result["image_generation"]
        peaks += [images["peak_rss_before_mb"]] + [v["peak_rss_mb"] for v in images["by_size"].values()]
    result["peak_rss_mb"] = max((p for p in peaks if p is not None), default=None)
    result["peak_rss_scope"] = "this bundle" if rss_reset else "process (peak could not be reset)"
    return result


def measure_decode(pipe, rng, tokens: int, repeat: int, prompt_length: int) -> dict:
    """Per-token latency from the generate loop itself (greedy, EOS ignored): the time
    between consecutive tokens it yields, i.e. one decode step plus sampling."""
    from emu_edge.runtime.sampling import Sampler, SamplingConfig

    prompt = _random_ids(rng, pipe.manifest.model.vocab_size, prompt_length)[0].tolist()
    gaps, totals = [], []
    for r in range(repeat + 1):
        stamps = [time.perf_counter()]
        for _ in pipe.stream_ids([prompt], tokens, Sampler(SamplingConfig()), []):
            stamps.append(time.perf_counter())
        if r == 0:
            continue  # warm-up
        gaps += list(np.diff(stamps[1:]) * 1e3)  # stamps[1] is the first token: prefill
        totals.append(stamps[-1] - stamps[0])
    gaps = np.asarray(gaps)
    return {
        "prompt_tokens": prompt_length, "new_tokens": tokens,
        "p50_ms": float(np.percentile(gaps, 50)), "p90_ms": float(np.percentile(gaps, 90)),
        "p99_ms": float(np.percentile(gaps, 99)),
        # Steady state: one step per token. End to end: prompt included.
        "tokens_per_s": float(1e3 / gaps.mean()),
        "tokens_per_s_end_to_end": float(tokens / np.median(totals)),
    }


def measure_unet_step(pipe, rng, repeat: int) -> dict:
    """One denoising step as the image loop runs it: a batch-2 U-Net call (cond and
    uncond), guidance and the scheduler step; timed over a short loop, per step."""
    m = pipe.manifest.model
    unet = pipe.graph("unet")
    dim = unet.input_shapes["encoder_hidden_states"][2]
    cond = rng.standard_normal((1, m.emu2.n_query, dim)).astype(np.float32)
    steps = 4
    timing = _median_ms(lambda: pipe.denoise(cond, steps=steps, seed=0), repeat)
    return {"batch": 2, **{k: v / steps for k, v in timing.items()}}


def measure_caption(pipe, image, repeat: int) -> dict:
    text = pipe.generate_text([image])
    n = len(pipe.tokenizer.encode(text, add_special_tokens=False).ids)
    return {"new_tokens_approx": n, **_median_ms(lambda: pipe.generate_text([image]), max(1, repeat // 2))}


def emu3_image_sides(pipe, quick: bool = False) -> tuple[int, list[int]]:
    """(the default side in codes, the square sides measured): the default and a half and a
    quarter of it, or of the largest square whose tokens fit the cache with the prompt (and
    the negative prompt, with guidance) when the default does not."""
    default = pipe.image_codes_size(None, None)[0]
    negative = (pipe.manifest.model.generation or {}).get("negative_prompt", "")

    def fits(side: int) -> bool:
        prompt = max(len(pipe.image_prompt(PROMPT, side, side)), len(pipe.image_prompt(negative, side, side)))
        return prompt + side * (side + 1) <= pipe.max_length   # the image's tokens but its last (EOF)

    top = default
    while top > 0 and not fits(top):
        top -= 1
    sides = sorted({s for s in (top // 4, top // 2, top) if s > 0})
    return default, sides[-2:] if quick else sides


def measure_emu3_images(pipe, repeat: int, quick: bool = False) -> dict:
    """One image per size, with the bundle's generation defaults (guidance, sampling), in
    the two calls generate_image makes: the decoder loop (image_ids) and the VQ decode
    (decode_image_ids). Per size: time per image, image tokens per second of the loop,
    the process's peak RSS while it made the images, and the KV cache the image's rows
    need (the cache held is sized for the Pipeline's max_length: kv_cache_held_bytes)."""
    m = pipe.manifest.model
    f = m.emu3.spatial_factor
    guidance = pipe.image_defaults(None, None, None, None)["guidance"]
    rows_per_image = 1 if guidance == 1 else 2     # with guidance, a row for the negative prompt
    default, sides = emu3_image_sides(pipe, quick)
    held = peak_rss_mb()    # the peak so far: each size's peak below starts from a reset
    by_size = {}
    for side in sides:
        tokens = side * (side + 1) + 1
        loop, vq, totals = [], [], []
        reset_peak_rss()
        for r in range(repeat + 1):
            start = time.perf_counter()
            ids = pipe.image_ids([PROMPT], side * f, side * f, seed=r)
            mid = time.perf_counter()
            pipe.decode_image_ids(ids, side, side)
            end = time.perf_counter()
            if r:     # the first is a warm-up
                loop.append(mid - start)
                vq.append(end - mid)
                totals.append(end - start)
        positions = len(pipe.image_prompt(PROMPT, side, side)) + tokens - 1
        by_size[f"{side * f}x{side * f}"] = {
            "codes": side, "tokens": tokens, "median_ms": float(np.median(totals) * 1e3),
            "min_ms": float(min(totals) * 1e3), "max_ms": float(max(totals) * 1e3),
            "vq_decode_ms": float(np.median(vq) * 1e3), "tokens_per_s": float(tokens / np.median(loop)),
            "peak_rss_mb": peak_rss_mb(), "kv_cache_bytes": m.kv.bytes_for(rows_per_image, positions)}
    return {"default": f"{default * f}x{default * f}", "guidance": guidance, "peak_rss_before_mb": held,
            "do_sample": pipe.image_defaults(None, None, None, None)["do_sample"],
            "kv_cache_held_bytes": m.kv.bytes_for(rows_per_image, pipe.max_length), "by_size": by_size}


def measure_scaling(pipe, rng, repeat: int, quick: bool = False) -> dict:
    """Decode step latency against context length (batch 1), and throughput against batch
    size. Each uses its own KV cache sized to what it needs, through the runtime's loop verbs."""
    m = pipe.manifest.model
    steps = 4 if quick else 16
    contexts = [n for n in CONTEXT_LENGTHS if n + steps <= pipe.max_length][: 2 if quick else None]

    def step_ms(session, ids) -> float:
        session.prefill(ids.tolist())
        tokens = ids[:, -1]
        start = time.perf_counter()
        for _ in range(steps):
            session.step(tokens)
        return (time.perf_counter() - start) * 1e3 / steps

    def median_step_ms(session, ids) -> float:
        step_ms(session, ids)  # warm-up
        return float(np.median([step_ms(session, ids) for _ in range(repeat)]))

    by_context = {}
    if contexts:
        session = pipe.session(1, max(contexts) + steps)
        for n in contexts:
            by_context[str(n)] = median_step_ms(session, _random_ids(rng, m.vocab_size, n))
    by_batch = {}
    if 16 + steps <= pipe.max_length:
        for b in BATCH_SIZES[: 2 if quick else None]:
            session = pipe.session(b, 16 + steps)
            ms = median_step_ms(session, _random_ids(rng, m.vocab_size, 16, b))
            by_batch[str(b)] = {"step_ms": ms, "tokens_per_s": b * 1e3 / ms}
    return {"decode_step_ms_by_context": by_context, "decode_by_batch": by_batch}


# -- the machine ----------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0), so each bundle's
    peak is its own; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 / (1024 if sys.platform == "darwin" else 1)
    except (ImportError, OSError):
        return None


def machine_info() -> dict:
    import os
    import platform

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# -- output ---------------------------------------------------------------------------------


def _ms(x: dict | None) -> str:
    return "n/a" if not x else f"{x['median_ms']:.2f} ms"


def format_table(r: dict) -> str:
    precisions = ", ".join(f"{k} {v}" for k, v in r["precision"].items())
    d = r["decode"]
    rows = [
        ("size on disk", f"{r['size_mb']:.1f} MB"),
        ("cold load", f"{r['load_s'] * 1e3:.0f} ms (open, verify, create every session)"),
        ("vision encoder", _ms(r.get("vision_encoder"))),
    ]
    rows += [(f"prefill {n} tokens", _ms(v)) for n, v in r["prefill"].items()]
    rows += [
        ("decode per token", f"p50 {d['p50_ms']:.2f} ms, p90 {d['p90_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms"),
        ("tokens per second", f"{d['tokens_per_s']:.0f} steady, {d['tokens_per_s_end_to_end']:.0f} with the "
                              f"{d['prompt_tokens']}-token prompt ({d['new_tokens']} new)"),
    ]
    if "regression" in r:
        rows += [
            (f"regression N={r['regression']['n']}", _ms(r["regression"])),
            ("U-Net step (batch 2, CFG)", _ms(r["unet_step"])),
            ("caption end to end", f"{_ms(r['caption'])} (~{r['caption']['new_tokens_approx']} tokens)"),
            (f"text-to-image ({r['text_to_image']['steps']} steps)", _ms(r["text_to_image"])),
        ]
    if "image_generation" in r:
        rows += _image_rows(r["image_generation"])
    by_context = r["scaling"]["decode_step_ms_by_context"]
    if by_context:
        rows.append(("decode step by context", ", ".join(f"{n}: {v:.2f} ms" for n, v in by_context.items())))
    by_batch = r["scaling"]["decode_by_batch"]
    if by_batch:
        rows.append(("tokens/s by batch", ", ".join(f"{b}: {v['tokens_per_s']:.0f}" for b, v in by_batch.items())))
    rss = r["peak_rss_mb"]
    rows.append(("peak RSS", "n/a" if rss is None else f"{rss:.0f} MB ({r['peak_rss_scope']})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{r['bundle']}  ({precisions}; attention {r['attention']})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines) + "\n"


def _image_rows(g: dict) -> list[tuple[str, str]]:
    how = f"guidance {g['guidance']:g}, {'sampled' if g['do_sample'] else 'greedy'}"
    if not g["by_size"]:
        return [("image generation", f"no image fits max_length (default {g['default']})")]
    rows = [("image generation", f"default {g['default']}, {how}; KV cache held "
                                 f"{g['kv_cache_held_bytes'] / 1e6:.1f} MB")]
    for size, v in g["by_size"].items():
        rss = "n/a" if v["peak_rss_mb"] is None else f"{v['peak_rss_mb']:.0f} MB"
        rows.append((f"image {size} ({v['tokens']} tokens)",
                     f"{v['median_ms']:.0f} ms (VQ decode {v['vq_decode_ms']:.0f} ms), {v['tokens_per_s']:.0f} "
                     f"image tokens/s, peak RSS {rss}, KV cache {v['kv_cache_bytes'] / 1e6:.1f} MB"))
    return rows


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit("emu-edge bench: --plot needs matplotlib: pip install 'emu-edge[bench]'") from e


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [r for r in results if r.get("image_generation", {}).get("by_size")]
    fig, axes = plt.subplots(1, 3 if images else 2, figsize=(15 if images else 10, 4))
    ax1, ax2 = axes[:2]
    for r in results:
        label = f"{Path(r['bundle']).name} ({r['precision'].get('decoder', '?')})"
        ctx = r["scaling"]["decode_step_ms_by_context"]
        if ctx:
            ax1.plot([int(n) for n in ctx], list(ctx.values()), marker="o", label=label)
        batch = r["scaling"]["decode_by_batch"]
        if batch:
            ax2.plot([int(b) for b in batch], [v["tokens_per_s"] for v in batch.values()], marker="o", label=label)
    ax1.set(xlabel="context length (tokens)", ylabel="decode step (ms)", title="decode latency vs context")
    ax1.set_xscale("log", base=2)
    ax2.set(xlabel="batch size", ylabel="tokens / s (all rows)", title="decode throughput vs batch")
    ax2.set_xscale("log", base=2)
    if images:
        ax3 = axes[2]
        for r in images:
            sizes = r["image_generation"]["by_size"].values()
            ax3.plot([v["codes"] ** 2 for v in sizes], [v["median_ms"] / 1e3 for v in sizes], marker="o",
                     label=f"{Path(r['bundle']).name} ({r['precision'].get('decoder', '?')})")
        ax3.set(xlabel="codes per image (h x w)", ylabel="time per image (s)", title="emu3 image vs size")
        ax3.set_xscale("log", base=2)
    for ax in axes:
        # From zero: on an autoscaled axis run-to-run noise of a few percent reads as a trend.
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
