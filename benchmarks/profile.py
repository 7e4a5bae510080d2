"""Where a bundle's time goes, per operator, and what the weight-reading kernels alone cost.

    python -m benchmarks.profile BUNDLE [--graph decoder|unet] [--threads 2] [--steps 128]
    python -m benchmarks.profile BUNDLE --genai GENAI_MODEL_DIR [--threads 2]
    python -m benchmarks.profile BUNDLE --guidance [--threads 2]

decoder: a batch-1 decode step (16-token prefill, then `--steps` steps on a cache of
prompt + steps positions, as the side-by-side suite decodes). Besides the profile it runs
the graph's MatMul / MatMulNBits / Gemm nodes alone, with the same weights, as one graph
with nothing else in it: that is what onnxruntime's kernels need just to read the weights,
the floor under any graph built from them, in time and in GB/s. And it times the text
loop's own Python per token (Pipeline.generate_ids with the graph runs made no-ops).

--genai DIR: our text loop (Pipeline.generate_ids) and onnxruntime-genai's own loop on the
same decoder (DIR: its model builder's folder), each beside its graph run alone through
onnxruntime's Python API (one token at the middle of the loop's cache, KV buffers bound in
place), and each call of one token (setup and prefill), all interleaved: what a later
token costs in each loop, and how much of it is the graph.

--guidance: the decoder graph alone at batch 2 against batch 1 (one token per row at
position 600, or the middle of a shorter context), interleaved: what a guided image's
second row costs the graph itself.

unet: one batch-2 call (guidance) at the bundle's resolution; each Conv's throughput in
GFLOP/s from its shapes, to compare with the CPU's peak.

The step times are measured without the profiler. onnxruntime's profiler adds a few
microseconds to every node, so the per-operator sums exceed them; read the shares, not the
sum. Needs the dev extras (onnx), like the rest of this folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from .harness import interleave

WEIGHT_OPS = ("MatMul", "MatMulNBits", "Gemm")


def _session(model, threads: int, profile_dir: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "profile")
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _per_unit_ms(timing) -> np.ndarray:
    return np.array(timing.seconds) / timing.work * 1e3


def per_operator(profile_file: str, runs: int, skip: int) -> dict[str, dict]:
    """{op type: {us per run, nodes per run, and for Conv the GFLOP per run}} from an
    onnxruntime profile, leaving out the first `skip` runs."""
    events = json.loads(Path(profile_file).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first = starts[skip] if len(starts) > skip else 0
    ops: dict[str, dict] = collections.defaultdict(lambda: {"us": 0.0, "nodes": 0, "gflop": 0.0})
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first:
            continue
        op = ops[e["args"]["op_name"]]
        op["us"] += e["dur"]
        op["nodes"] += 1
        if e["args"]["op_name"] == "Conv":
            op["gflop"] += _conv_flop(e["args"]) / 1e9
    return {name: {"us": v["us"] / runs, "nodes": v["nodes"] / runs, "gflop": v["gflop"] / runs}
            for name, v in sorted(ops.items(), key=lambda kv: -kv[1]["us"])}


def _conv_flop(args: dict) -> float:
    """2 x output elements x (input channels per group x kernel area) for one Conv."""
    shapes = [next(iter(s.values())) for s in args["input_type_shape"]]
    out = next(iter(args["output_type_shape"][0].values()))
    return 2.0 * float(np.prod(out)) * float(np.prod(shapes[1][1:]))


def weight_ops_alone(decoder_onnx: Path):
    """The decoder's weight-reading nodes, with their weights and attributes, each fed a
    [1, K] graph input and written to a graph output: (model, feeds, bytes of weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    source = onnx.load(str(decoder_onnx))
    init = {t.name: t for t in source.graph.initializer}
    nodes, inputs, outputs, used = [], {}, [], {}
    for node in source.graph.node:
        if node.op_type not in WEIGHT_OPS or node.input[1] not in init:
            continue
        weight = numpy_helper.to_array(init[node.input[1]])
        k = next(a.i for a in node.attribute if a.name == "K") if node.op_type == "MatMulNBits" else (
            weight.shape[1] if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            else weight.shape[0])
        x = f"x{k}"
        inputs.setdefault(x, helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, k]))
        y = f"y{len(nodes)}"
        nodes.append(helper.make_node(node.op_type, [x, *node.input[1:]], [y], domain=node.domain,
                                      name=node.name or y, **{a.name: helper.get_attribute_value(a)
                                                              for a in node.attribute}))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
        used.update({name: init[name] for name in node.input[1:] if name in init})
    graph = helper.make_graph(nodes, "weights_alone", list(inputs.values()), outputs, list(used.values()))
    model = helper.make_model(graph, opset_imports=list(source.opset_import))
    model.ir_version = source.ir_version
    nbytes = sum(numpy_helper.to_array(t).nbytes for t in used.values())
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, int(name[1:])), dtype=np.float32) for name in inputs}
    return model, feeds, nbytes


def profile_decoder(bundle: Path, threads: int, steps: int, prompt: int = 16) -> dict:
    from emu_edge.runtime.backends import OnnxBackend
    from emu_edge.runtime.bundle import Bundle
    from emu_edge.runtime.decoder import DecoderSession

    manifest = Bundle.open(bundle, verify=False).manifest
    spec = manifest.model
    path = bundle / manifest.role("decoder").file
    special = spec.special_ids()
    plain_ids = [i for i in range(spec.vocab_size) if i not in special]
    rng = np.random.default_rng(0)
    ids = rng.choice(plain_ids, prompt).tolist()
    step = rng.choice(plain_ids, 1)

    def decode(session):
        session.prefill([ids])
        for _ in range(steps):
            session.step(step)

    plain = DecoderSession(OnnxBackend(path, threads=threads), manifest, 1, prompt + steps)
    model, feeds, nbytes = weight_ops_alone(path)
    alone = _session(model, threads)

    def weights_alone():
        for _ in range(steps + 1):
            alone.run(None, feeds)

    # Interleaved, so that both see the same machine (a shared one drifts by tens of percent).
    timed = interleave(None, {"step": lambda: decode(plain), "alone": weights_alone}, rounds=7, work=steps + 1)
    step_ms, alone_ms = (_per_unit_ms(timed[k]) for k in ("step", "alone"))
    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxBackend(path, threads=threads)
        backend.session = _session(path, threads, tmp)   # the same graph, profiled
        decode(DecoderSession(backend, manifest, 1, prompt + steps))  # warm-up: not counted
        for _ in range(3):
            decode(DecoderSession(backend, manifest, 1, prompt + steps))
        ops = per_operator(backend.session.end_profiling(), runs=3 * (steps + 1), skip=steps + 1)
    return {"graph": "decoder", "bundle": str(bundle), "threads": threads,
            "loop_python_us": loop_python_us(bundle, threads, prompt, steps),
            "step_ms": {"median": float(np.median(step_ms)), "min": float(step_ms.min())},
            "per_operator": ops,
            "weight_ops_alone": {"nodes": len(model.graph.node), "weight_mb": nbytes / 1e6,
                                 "ms": float(np.median(alone_ms)), "min_ms": float(alone_ms.min()),
                                 "gb_per_s": nbytes / (float(np.median(alone_ms)) / 1e3) / 1e9}}


def loop_python_us(bundle: Path, threads: int, prompt: int, steps: int) -> float:
    """Microseconds of Python per token in the runtime's text loop (Pipeline.generate_ids,
    greedy): the loop timed with every bound graph run replaced by a no-op, so what is
    left is our code around the graphs (best of 7)."""
    from emu_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads, max_length=prompt + steps, verify=False)
    special = pipe.manifest.model.special_ids()
    plain = [i for i in range(pipe.manifest.model.vocab_size) if i not in special]
    ids = np.random.default_rng(0).choice(plain, prompt).tolist()
    for backend in pipe.backends.values():
        backend.session.run_with_iobinding = lambda binding, run_options=None: None
    timed = interleave(None, {"loop": lambda: pipe.generate_ids(ids, steps, ignore_eos=True)}, rounds=7,
                       work=steps, pause=0)
    return float(np.min(_per_unit_ms(timed["loop"]))) * 1e3


ROUNDS_VS_GENAI = 15   # steps of a small decoder are tens of microseconds: more rounds than usual


def _graph_steps(session, feeds: dict, kv: dict, logits: str, steps: int):
    """`steps` runs of a decoder graph on one token at a fixed position, its KV buffers
    bound as both past and present (as both loops bind them): the graph alone, no loop."""
    from onnxruntime import OrtValue

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(value))
    for past, present in kv.items():
        buffer = OrtValue.ortvalue_from_numpy(feeds[past])
        binding.bind_ortvalue_input(past, buffer)
        binding.bind_ortvalue_output(present, buffer)
    binding.bind_output(logits)

    def run():
        for _ in range(steps):
            session.run_with_iobinding(binding)
    return run


def _our_graph_steps(session, manifest, batch: int, length: int, position: int, token: int, steps: int):
    """_graph_steps on one of our decoders: `batch` rows at `position` of a `length` cache."""
    role, kv = manifest.role("decoder"), manifest.model.kv
    name = role.name
    rng = np.random.default_rng(0)
    pairs = [(name(f"past_{r}", i), name(f"present_{r}", i)) for i in range(kv.num_layers) for r in ("key", "value")]
    feeds = {name("input_ids"): np.full((batch, 1), token, np.int64),
             name("seqlens_k"): np.full(batch, position, np.int32),
             name("total_sequence_length"): np.array(position + 1, np.int32)}
    feeds.update({past: rng.standard_normal([batch, kv.num_kv_heads, length, kv.head_dim], dtype=np.float32)
                  for past, _ in pairs})
    if role.has("image_embeds"):
        width = next(i.shape[1] for i in session.get_inputs() if i.name == name("image_embeds"))
        feeds[name("image_embeds")] = np.zeros([0, width], np.float32)
    return _graph_steps(session, feeds, dict(pairs), name("logits"), steps)


def guidance_cost(bundle: Path, threads: int, position: int = 600, steps: int = 64) -> dict:
    """The decoder graph alone at batch 2 (a guided image's two rows) against batch 1, at
    one position of the cache, interleaved: what guidance costs the graph itself."""
    from emu_edge.runtime.bundle import Bundle

    manifest = Bundle.open(bundle, verify=False).manifest
    session = _session(bundle / manifest.role("decoder").file, threads)
    token = next(i for i in range(manifest.model.vocab_size) if i not in manifest.model.special_ids())
    position = min(position, manifest.model.max_length // 2 - 1)   # a model with fewer positions
    length = 2 * position
    peers = {f"batch {b}": _our_graph_steps(session, manifest, b, length, position, token, steps) for b in (1, 2)}
    timed = interleave(None, peers, rounds=ROUNDS_VS_GENAI, work=steps)
    ms = {k: float(np.median(_per_unit_ms(t))) for k, t in timed.items()}
    return {"bundle": str(bundle), "threads": threads, "position": position, "step_ms": ms,
            "cost": ms["batch 2"] / ms["batch 1"]}


def versus_genai(bundle: Path, genai_dir: Path, threads: int, steps: int, prompt: int = 16) -> dict:
    """Our text loop and onnxruntime-genai's on the same decoder, each beside its graph run
    alone (one token at the middle position of the loop's cache, `steps` times), all four
    interleaved: per token, what each loop adds to its graph."""
    from emu_edge.runtime.pipeline import Pipeline

    from .peers import genai_generate, ours_generate

    length = prompt + steps
    pipe = Pipeline.load(bundle, threads=threads, max_length=length, verify=False)
    spec = pipe.manifest.model
    special = spec.special_ids()
    rng = np.random.default_rng(0)
    ids = rng.choice([i for i in range(spec.vocab_size) if i not in special], prompt + 1).tolist()
    position = prompt + steps // 2
    genai = _session(genai_dir / "model.onnx", threads)
    genai_kv = [(f"past_key_values.{i}.{r}", f"present.{i}.{r}") for i in range(spec.kv.num_layers)
                for r in ("key", "value")]
    genai_feeds = {"input_ids": np.array([[ids[-1]]], np.int64), "attention_mask": np.ones((1, position + 1), np.int64)}
    genai_feeds.update({past: rng.standard_normal([1, spec.kv.num_kv_heads, length, spec.kv.head_dim],
                                                  dtype=np.float32) for past, _ in genai_kv})
    peers = {"emu-edge loop": ours_generate(pipe, ids[:prompt], steps),
             "emu-edge prefill": ours_generate(pipe, ids[:prompt], 1),
             "emu-edge graph alone": _our_graph_steps(pipe.backends["decoder"].session, pipe.manifest, 1, length,
                                                      position, ids[-1], steps),
             "onnxruntime-genai loop": genai_generate(genai_dir, ids[:prompt], steps),
             "onnxruntime-genai prefill": genai_generate(genai_dir, ids[:prompt], 1),
             "onnxruntime-genai graph alone": _graph_steps(genai, genai_feeds, dict(genai_kv), "logits", steps)}
    work = {k: 1 if k.endswith("prefill") else steps for k in peers}
    timed = interleave(None, peers, rounds=ROUNDS_VS_GENAI, work=work)
    us = {k: float(np.median(_per_unit_ms(t))) * 1e3 for k, t in timed.items()}
    for who in ("emu-edge", "onnxruntime-genai"):
        # A token of the loop past the first: the call less its setup and prefill, per token.
        us[f"{who} step"] = (us[f"{who} loop"] * steps - us[f"{who} prefill"]) / (steps - 1)
    return {"bundle": str(bundle), "genai": str(genai_dir), "threads": threads, "steps": steps, "us_per_token": us,
            "spread_us": {k: [float(x * 1e3) for x in (_per_unit_ms(t).min(), _per_unit_ms(t).max())]
                          for k, t in timed.items()}}


def report_versus(result: dict) -> str:
    us, spread = result["us_per_token"], result["spread_us"]
    lines = [f"{result['bundle']} vs {result['genai']}, {result['threads']} threads, {result['steps']} tokens, "
             f"{ROUNDS_VS_GENAI} interleaved rounds: us per token, median [min-max]", "",
             "| | whole call, per token | setup + prefill + 1 token | a later token | graph alone | "
             "a later token less the graph |", "|---|---:|---:|---:|---:|---:|"]
    for who in ("emu-edge", "onnxruntime-genai"):
        cells = [f"{us[k]:.1f} [{spread[k][0]:.1f}-{spread[k][1]:.1f}]"
                 for k in (f"{who} loop", f"{who} prefill", f"{who} graph alone")]
        step = us[f"{who} step"]
        lines.append(f"| {who} | {cells[0]} | {cells[1]} | {step:.1f} | {cells[2]} | "
                     f"{step - us[f'{who} graph alone']:+.1f} |")
    ratio = {k: us[f"onnxruntime-genai {k}"] / us[f"emu-edge {k}"] for k in ("loop", "step", "graph alone")}
    lines += ["", f"emu-edge vs onnxruntime-genai (above 1: ours faster): whole call {ratio['loop']:.2f}x, "
                  f"a later token {ratio['step']:.2f}x, graph alone {ratio['graph alone']:.2f}x"]
    return "\n".join(lines)


def report_guidance(result: dict) -> str:
    ms = result["step_ms"]
    return (f"{result['bundle']}, {result['threads']} threads, the decoder graph alone at position "
            f"{result['position']}, {ROUNDS_VS_GENAI} interleaved rounds: batch 1 {ms['batch 1']:.3f} ms, "
            f"batch 2 {ms['batch 2']:.3f} ms: guidance costs the graph {result['cost']:.2f}x")


def profile_unet(bundle: Path, threads: int, runs: int = 10) -> dict:
    sess = _session(bundle / "unet.onnx", threads)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [2 if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = (rng.uniform(0, 999, shape).astype(np.float32) if i.name == "timestep"
                         else rng.standard_normal(shape).astype(np.float32))
    gemm, gemm_feeds, gemm_flop = _sgemm(threads)
    timed = interleave(None, {"unet": lambda: sess.run(None, feeds), "sgemm": lambda: gemm.run(None, gemm_feeds)},
                       rounds=runs)
    ms, gemm_ms = (_per_unit_ms(timed[k]) for k in ("unet", "sgemm"))
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _session(bundle / "unet.onnx", threads, tmp)
        for _ in range(runs + 1):
            profiled.run(None, feeds)
        ops = per_operator(profiled.end_profiling(), runs=runs, skip=1)
    return {"graph": "unet", "bundle": str(bundle), "threads": threads, "resolution": feeds["sample"].shape[-1],
            "step_ms": {"median": float(np.median(ms)), "min": float(ms.min())}, "per_operator": ops,
            "sgemm_gflop_per_s": gemm_flop / (float(np.median(gemm_ms)) / 1e3) / 1e9}


def _sgemm(threads: int, n: int = 1024):
    """A square fp32 MatMul in onnxruntime: the machine's practical compute peak to hold
    the convolutions against. (session, feeds, flop per run)"""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    # The weight a constant, as a Conv's is (onnxruntime packs it once, at load).
    weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return _session(model, threads), {"a": rng.standard_normal((n, n), dtype=np.float32)}, 2.0 * n**3


def report(result: dict) -> str:
    ops = result["per_operator"]
    total = sum(o["us"] for o in ops.values())
    step = result["step_ms"]
    lines = [f"{result['graph']} of {result['bundle']}, {result['threads']} threads: "
             f"{step['median']:.3f} ms a {'step' if result['graph'] == 'decoder' else 'call'} "
             f"(min {step['min']:.3f}), unprofiled", "",
             "| operator | nodes | us per run (profiled) | share | |", "|---|---:|---:|---:|---|"]
    for name, o in ops.items():
        extra = f"{o['gflop'] / (o['us'] / 1e6):.0f} GFLOP/s" if o["gflop"] else ""
        lines.append(f"| {name} | {o['nodes']:.0f} | {o['us']:.1f} | {o['us'] / total:.1%} | {extra} |")
    if "loop_python_us" in result:
        lines += ["", f"The text loop's own Python (graph runs replaced by no-ops): "
                      f"{result['loop_python_us']:.1f} us a token."]
    alone = result.get("weight_ops_alone")
    if alone:
        lines += ["", f"The {alone['nodes']} weight-reading nodes alone (same weights and kernels, nothing else "
                      f"in the graph): {alone['ms']:.3f} ms (min {alone['min_ms']:.3f}) for {alone['weight_mb']:.1f} MB "
                      f"= {alone['gb_per_s']:.1f} GB/s, {alone['ms'] / step['median']:.0%} of the full step."]
    if "sgemm_gflop_per_s" in result:
        lines += ["", f"A 1024 x 1024 x 1024 fp32 MatMul on the same threads, interleaved: "
                      f"{result['sgemm_gflop_per_s']:.0f} GFLOP/s."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--graph", choices=("decoder", "unet"), default="decoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=128, help="decode steps per pass (decoder)")
    parser.add_argument("--genai", type=Path, metavar="DIR",
                        help="instead: our text loop and onnxruntime-genai's (its model folder, the same decoder) "
                             "side by side, each beside its graph alone")
    parser.add_argument("--guidance", action="store_true",
                        help="instead: the decoder graph alone at batch 2 (guidance's two rows) against batch 1")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.genai or args.guidance:
        if args.genai:
            result = versus_genai(args.bundle, args.genai, args.threads, args.steps)
            print(report_versus(result))
        else:
            result = guidance_cost(args.bundle, args.threads)
            print(report_guidance(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    if not (args.bundle / f"{args.graph}.onnx").is_file():
        parser.error(f"{args.bundle} has no {args.graph}.onnx")
    result = (profile_decoder(args.bundle, args.threads, args.steps) if args.graph == "decoder"
              else profile_unet(args.bundle, args.threads))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
