"""`emu-edge bench [BUNDLE...] [--json FILE] [--plot FILE]`: what a bundle costs on this device.

One table per bundle, measured through the runtime's own Pipeline (the code an app runs):

    size on disk, cold load (open + verify + every graph's session), vision encoder,
    prefill per prompt length, decode per token (p50 / p90 / p99, from the generate loop)
    and tokens per second, regression of the N visual embeddings, one U-Net step with
    guidance (cond + uncond, batch 2), end-to-end caption and text-to-image, peak RSS

and how decode cost grows with context length and batch size (--plot draws it). Torch-free:
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
    for name in ("vision_encoder", "unet"):
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
    if pipe.is_multimodal:
        image = rng.integers(0, 256, size=(m.emu2.image_size, m.emu2.image_size, 3), dtype=np.uint8)
        result["vision_encoder"] = _median_ms(lambda: pipe.encode_visuals([("image", image)]), repeat)

    session = pipe.session(1)
    lengths = [n for n in PREFILL_LENGTHS if n + tokens <= pipe.max_length] or [min(16, pipe.max_length // 2)]
    result["prefill"] = {}
    for n in lengths:
        ids = _random_ids(rng, m.vocab_size, n)
        result["prefill"][str(n)] = _median_ms(lambda: session.prefill(ids.tolist()), repeat)

    result["decode"] = measure_decode(pipe, rng, min(tokens, pipe.max_length - lengths[0]), repeat, lengths[0])
    if pipe.is_multimodal:
        encoded = pipe.encode_items([PROMPT], "image")
        result["regression"] = {"n": m.emu2.n_query, **_median_ms(lambda: pipe.regress([encoded]), repeat)}
        result["unet_step"] = measure_unet_step(pipe, rng, repeat)
        result["caption"] = measure_caption(pipe, image, repeat)
        steps = steps or (m.generation or {}).get("steps", 25)
        result["text_to_image"] = {"steps": steps, **_median_ms(
            lambda: pipe.generate_image([PROMPT], steps=steps, seed=0), max(1, repeat // 2))}
    result["scaling"] = measure_scaling(pipe, rng, repeat=max(1, repeat // 2), quick=quick)
    result["peak_rss_mb"] = peak_rss_mb()
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


def bundle_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit("emu-edge bench: --plot needs matplotlib: pip install 'emu-edge[bench]'") from e


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
    for ax in (ax1, ax2):
        # From zero: on an autoscaled axis run-to-run noise of a few percent reads as a trend.
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
