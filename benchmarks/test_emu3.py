"""Emu3 image generation side by side: one random Emu3 folder through every peer, all of
them in the same interleaved rounds.

One unit of work: an image of N x N codes (32 x 32 on emu3-30m, 256 x 256 pixels: 32 rows
of 32 visual ids and an EOL, then EOF, 1,057 tokens), greedy, the same prompt ids and
negative prompt for every peer, at guidance 3 and at guidance 1 (no classifier-free
guidance), so the cost of guidance comes from the same rounds:

    transformers eager fp32   `generate` with prefix_allowed_tokens_fn and its own CFG
                              (a second, sequential forward per step), decode_image_tokens
    emu-edge fp32/int8/int4   Pipeline.image_ids (cond and uncond rows in one batched
                              decoder call) and decode_image_ids
    onnxruntime-genai fp32/int4   the text model as a Llama folder, plain greedy decode of
                              as many tokens after the same prompt (no row constraint)

Time per image includes the VQ decode and the postprocess to PIL; the token rate is the
decoder loop alone (the image's time less its VQ decode, measured in the same call).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from . import peak_rss, peers
from .harness import Timing, interleave

GUIDANCE = 3.0
NEGATIVE = "a small blue square"
TARGET_FP32_VS_TRANSFORMERS = 3.0
TARGET_INT4_VS_TRANSFORMERS = 5.0
TARGET_CFG_COST = 1.3
TARGET_VS_GENAI = 1.0
# The warm-up image: every peer's kernels, sessions and caches made once before the rounds,
# at a size that costs little (a warm-up round at the full size costs as much as a timed one).
WARM_CODES = 2
PRECISIONS = ("fp32", "int8", "int4")


def _label(who: str, guided: bool) -> str:
    return f"{who} CFG {GUIDANCE:g}" if guided else f"{who} no CFG"


def _image_peers(workspace, name: str, prompt_ids: list[int], negative_ids: list[int], max_length: int) -> dict:
    """label -> make(codes) -> ImagePeer, for both guidance settings."""
    folder = workspace.checkpoint(name)
    model = workspace.torch_model(name)
    pipes = {p: workspace.pipeline(name, p, max_length) for p in PRECISIONS}
    f = pipes["fp32"].manifest.model.emu3.spatial_factor
    makers = {}
    for guided in (True, False):
        g = GUIDANCE if guided else 1.0

        def torch_peer(n, g=g):
            # The prompt ids say the full size; a warm-up image only stops sooner.
            return peers.emu3_torch_image(model, folder, prompt_ids, negative_ids, n, n, g)

        makers[_label("transformers eager fp32", guided)] = torch_peer
        for precision, pipe in pipes.items():
            makers[_label(f"emu-edge {precision}", guided)] = (
                lambda n, pipe=pipe, g=g: peers.ours_image(pipe, peers.PROMPT, NEGATIVE, n * f, n * f, g))
    return makers


def _build_genai(workspace, name: str) -> None:
    try:
        workspace.genai(name, "fp32")   # builds fp32 and int4 together
    except pytest.skip.Exception:
        pass   # _genai_peers records why


def _genai_peers(workspace, name: str, prompt_ids: list[int], tokens: int) -> tuple[dict, dict]:
    found, missing = {}, {}
    for precision in ("fp32", "int4"):
        label = f"onnxruntime-genai {precision}"
        try:
            run = peers.genai_generate(workspace.genai(name, precision), prompt_ids, tokens)
            run()
            found[label] = run
        except pytest.skip.Exception as e:
            missing[label] = str(e)
        except Exception as e:  # the builder's graph may not run on this model
            missing[label] = f"{type(e).__name__}: {e}"
    return found, missing


def _token_part(label: str, timing: Timing, peer: peers.ImagePeer, tokens: int) -> Timing:
    """The decoder loop's seconds of every round: the call less its VQ decode (the peer was
    called in the rounds alone, so its pixel times are the rounds')."""
    return Timing(label, [t - p for t, p in zip(timing.seconds, peer.pixel_seconds)], work=tokens)


def _peak_rss(workspace, name: str, spec: dict, max_length: int) -> dict:
    """Each of our image peers with guidance, in a fresh process (benchmarks/peak_rss.py)."""
    return {_label(f"emu-edge {precision}", True): peak_rss.measure(dict(
        spec, peer="ours", bundle=str(workspace.bundle(name, precision)), max_length=max_length))
        for precision in PRECISIONS}


@pytest.mark.smoke
def test_emu3_image_side_by_side(benchmark, workspace, settings, results):
    name, n, rounds = settings.emu3, settings.emu3_codes, settings.emu3_rounds
    folder = workspace.checkpoint(name)
    # What is not timed runs side by side, the slow part being processes that import torch:
    # onnxruntime-genai's builder, and transformers' image for its peak RSS, while the
    # bundles are made here. All of it is over before the rounds start. The second thread
    # only starts processes and waits on them: what it needs that runs in this process
    # (the builder's Llama folder) is made first, since transformers' lazy imports are not
    # safe from two threads (a class looked up mid-import is missing).
    workspace.genai_source(name)
    with ThreadPoolExecutor(2) as pool:
        built = pool.submit(_build_genai, workspace, name)
        # The prompt ids come from the runtime's own image prompt (what Emu3Processor writes
        # for image generation), and every peer is given the same ids.
        probe = workspace.pipeline(name, "fp32")
        f = probe.manifest.model.emu3.spatial_factor
        prompt_ids, negative_ids = probe.image_prompt(peers.PROMPT, n, n), probe.image_prompt(NEGATIVE, n, n)
        tokens = peers.image_tokens(n, n)
        # Caches as long as one image needs (the last token is never fed back), as
        # onnxruntime-genai's max_length is the prompt and the new tokens.
        max_length = max(len(prompt_ids), len(negative_ids)) + tokens - 1
        spec = dict(threads=settings.threads, prompt=peers.PROMPT, negative=NEGATIVE, height=n * f, width=n * f,
                    guidance=GUIDANCE, prompt_ids=prompt_ids, negative_ids=negative_ids, rows=n, cols=n)
        torch_rss = pool.submit(peak_rss.measure, dict(spec, peer="transformers", folder=str(folder)))
        makers = _image_peers(workspace, name, prompt_ids, negative_ids, max_length)
        built.result()
        torch_rss = torch_rss.result()
    for make in makers.values():
        make(WARM_CODES)()
    images = {label: make(n) for label, make in makers.items()}
    genai, missing = _genai_peers(workspace, name, prompt_ids, tokens)
    benchmark.group = f"emu3 image {name}"
    timings = interleave(benchmark, {**images, **genai}, rounds, warmup=0,
                         work={**{label: 1 for label in images}, **{label: tokens for label in genai}})

    rss = {**_peak_rss(workspace, name, spec, max_length), _label("transformers eager fp32", True): torch_rss}
    extra = {"checkpoint": str(folder), "tokens": tokens, **_figures(images, timings, tokens), "peak_rss_mb": rss,
             "note": f"{n}x{n} codes ({n * f}x{n * f} pixels), prompt {peers.PROMPT!r}, negative prompt {NEGATIVE!r}, "
                     f"greedy; warm-up: one {WARM_CODES}x{WARM_CODES}-code image per peer; peak RSS: each peer "
                     "with guidance in a fresh process that loads it and makes one image (VmHWM; also its RSS once "
                     "loaded)"}
    results.compare(f"emu3 image: {name}, {n}x{n} codes ({tokens} tokens), guidance {GUIDANCE:g} and none",
                    {label: timings[label] for label in images}, "image", subject=_label("emu-edge fp32", True),
                    extra=extra, benchmark=benchmark)
    transformers = timings[_label("transformers eager fp32", True)].median
    for precision, required in (("fp32", TARGET_FP32_VS_TRANSFORMERS), ("int4", TARGET_INT4_VS_TRANSFORMERS)):
        results.target(f"emu3 {precision} image vs transformers, guidance {GUIDANCE:g} ({name})",
                       transformers / timings[_label(f"emu-edge {precision}", True)].median, required)
    cfg_cost = extra["cfg_cost"]
    for precision in ("fp32", "int4"):
        results.target(f"emu3 guidance cost, emu-edge {precision} ({name})", cfg_cost[f"emu-edge {precision}"],
                       TARGET_CFG_COST, note=f"image with guidance {GUIDANCE:g} / without; transformers pays "
                                             f"{cfg_cost['transformers eager fp32']:.2f}x", at_most=True)
    _against_genai(results, benchmark, name, images, timings, genai, missing, tokens)


def _figures(images: dict, timings: dict, tokens: int) -> dict:
    """Per image peer: the decoder loop's token rate, the VQ decode's share of the image,
    the cost of guidance, and greedy agreement with our fp32 tokens."""
    shares = {label: float(np.median([p / t for p, t in zip(peer.pixel_seconds, timings[label].seconds)]))
              for label, peer in images.items()}
    whos = ["transformers eager fp32"] + [f"emu-edge {p}" for p in PRECISIONS]
    agreement = {}
    for guided in (True, False):
        reference = images[_label("emu-edge fp32", guided)].last_tokens
        for who in ("transformers eager fp32", "emu-edge int8", "emu-edge int4"):
            key = "greedy_prefix_vs_fp32" if who.startswith("emu-edge") else "greedy_prefix_vs_emu_edge_fp32"
            agreement[_label(who, guided)] = {key: peers.prefix_agreement(reference,
                                                                          images[_label(who, guided)].last_tokens)}
    return {"agreement": agreement,
            "tokens_per_s": {label: round(_token_part(label, timings[label], peer, tokens).rate, 1)
                             for label, peer in images.items()},
            "vq_decode_share": {label: round(share, 4) for label, share in shares.items()},
            "cfg_cost": {who: round(timings[_label(who, True)].median / timings[_label(who, False)].median, 3)
                         for who in whos}}


def _against_genai(results, benchmark, name: str, images: dict, timings: dict, genai: dict, missing: dict,
                   tokens: int) -> None:
    """Our image's decoder loop without guidance against onnxruntime-genai's greedy decode
    of as many tokens on the same text model, from the same rounds."""
    loops = {}
    for precision in PRECISIONS:
        image = _label(f"emu-edge {precision}", False)
        label = f"emu-edge {precision} image tokens, no CFG"
        loops[label] = _token_part(label, timings[image], images[image], tokens)
    loops.update({label: timings[label] for label in genai})
    note = "ours: the image's decoder loop (row constraint, greedy); onnxruntime-genai: plain greedy decode"
    if missing:
        note += "; " + "; ".join(f"{p} left out: {why[:300]}" for p, why in missing.items())
    results.compare(f"emu3 image tokens vs onnxruntime-genai: {name} ({tokens} tokens after the prompt)", loops,
                    "tok", subject="emu-edge fp32 image tokens, no CFG", extra={"note": note}, benchmark=benchmark)
    for precision in ("fp32", "int4"):
        genai_label = f"onnxruntime-genai {precision}"
        if genai_label in loops:
            ours = loops[f"emu-edge {precision} image tokens, no CFG"]
            results.target(f"emu3 {precision} image tokens vs onnxruntime-genai {precision} ({name})",
                           loops[genai_label].median / ours.median, TARGET_VS_GENAI)
