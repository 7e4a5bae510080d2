"""`emu-edge build-engines`: one TensorRT engine per graph of a bundle, into the engine cache.

    emu-edge build-engines BUNDLE --precision fp16 | int8 [--graphs decoder,unet] [--cache DIR]

Each graph is first checked statically (emu_edge.export.trt_check); then parsed with
TensorRT's ONNX parser and built with one optimization profile from the manifest's
min/opt/max shapes and a timing cache shared by all builds on this TensorRT and GPU. The
serialized engine goes to the engine cache (emu_edge.runtime.tensorrt.EngineCache), keyed
by TensorRT version, GPU, compute capability, precision and the ONNX file's sha256.

How precision is chosen follows TensorRT's own direction (strong typing; TensorRT 11
removed the precision builder flags):

    graph precision   --precision   network                          engine
    fp16              fp16 / int8   strongly typed (the graph's types)  fp16
    int8 (QDQ)        int8          strongly typed: explicit quantization from the Q/DQ
                                    nodes (quantize with --tensorrt: signed, symmetric)   int8
    int8 (QDQ)        fp16          refused: the Q/DQ nodes fix INT8; use the fp16 bundle
    fp32              fp16 / int8   TensorRT 10: weakly typed with the FP16 flag        fp16
                                    TensorRT 11+: refused, build from the fp16 bundle
                                    (emu-edge quantize BUNDLE --precision fp16)
    int4 (MatMulNBits) -            refused by the check (onnxruntime's format)

`plan_engine` makes that choice without TensorRT, so it is tested in CI; `build_engine`
is the TensorRT part, written against TensorRT 10's documented Python API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from emu_edge.export.trt_check import check_graph, tensorrt_graphs

BUILD_PRECISIONS = ("fp16", "int8")
# Shape tensors (int inputs whose values size other tensors) need value ranges, which the
# manifest's shape profiles do not carry; the decoder contract fixes the one we have.
SHAPE_TENSOR_VALUES = {"total_sequence_length": lambda model: ([1], [max(1, model.max_length // 2)],
                                                               [model.max_length])}


class EngineBuildError(RuntimeError):
    pass


@dataclass
class EnginePlan:
    graph: str
    precision: str                # of the engine, as keyed in the cache
    strongly_typed: bool
    flags: list[str] = field(default_factory=list)   # trt.BuilderFlag names
    note: str = ""


def plan_engine(graph: str, graph_precision: str, requested: str, tensorrt_major: int) -> EnginePlan:
    if requested not in BUILD_PRECISIONS:
        raise EngineBuildError(f"unknown engine precision {requested!r}; valid: {', '.join(BUILD_PRECISIONS)}")
    if graph_precision == "fp16":
        return EnginePlan(graph, "fp16", strongly_typed=True, note="fp16 graph, strongly typed")
    if graph_precision == "int8":
        if requested != "int8":
            raise EngineBuildError(f"{graph} is a static-INT8 (Q/DQ) graph, which TensorRT builds in INT8 only; "
                                   f"use --precision int8, or build fp16 engines from an fp16 bundle")
        return EnginePlan(graph, "int8", strongly_typed=True, note="explicit quantization from Q/DQ nodes")
    if graph_precision == "fp32":
        if tensorrt_major >= 11:
            raise EngineBuildError(
                f"TensorRT {tensorrt_major} builds only strongly typed networks, so an fp32 {graph} graph gives an "
                "fp32 engine: quantize the bundle first (emu-edge quantize BUNDLE --precision fp16 --out B16, or "
                "--precision int8 --tensorrt for Q/DQ graphs) and build from that")
        note = "fp32 graph, FP16 allowed (weak typing)"
        if requested == "int8":
            note += "; no Q/DQ nodes, so no INT8"
        return EnginePlan(graph, "fp16", strongly_typed=False, flags=["FP16"], note=note)
    raise EngineBuildError(f"{graph} is {graph_precision}; TensorRT builds from fp32, fp16 or static-INT8 graphs")


def _tensorrt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: Path, plan: EnginePlan, profiles: dict, model_spec, timing_cache: Path,
                 workspace_bytes: int | None = None, log=print) -> bytes:
    """Parse and build one graph; returns the serialized engine."""
    from emu_edge.runtime.tensorrt import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            if tensor.name not in SHAPE_TENSOR_VALUES:
                raise EngineBuildError(f"{onnx_path.name}: input {tensor.name} is a shape tensor and no value range "
                                       "is known for it")
            profile.set_shape_input(tensor.name, *SHAPE_TENSOR_VALUES[tensor.name](model_spec))
            continue
        if tensor.name in profiles:
            p = profiles[tensor.name]
            profile.set_shape(tensor.name, p["min"], p["opt"], p["max"])
        elif any(d < 0 for d in tensor.shape):
            raise EngineBuildError(f"{onnx_path.name}: input {tensor.name} is dynamic and has no shape profile in "
                                   "the manifest")
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine for {onnx_path.name}; see its log above")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engines(bundle_path: str | Path, precision: str, graphs: list[str] | None = None,
                  cache_dir: str | Path | None = None, workspace_bytes: int | None = None, log=print) -> list[dict]:
    import onnx

    from emu_edge.runtime.bundle import Bundle
    from emu_edge.runtime.tensorrt import EngineCache, EngineKey, current_environment, import_tensorrt

    if precision not in BUILD_PRECISIONS:
        raise EngineBuildError(f"unknown engine precision {precision!r}; valid: {', '.join(BUILD_PRECISIONS)}")
    bundle = Bundle.open(bundle_path, onnxruntime_version=None)
    available = tensorrt_graphs(bundle.manifest)
    names = graphs or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise EngineBuildError(f"unknown graph(s) {', '.join(unknown)}; TensorRT graphs of this bundle: "
                               f"{', '.join(available)}")
    plans, problems = {}, []
    trt = import_tensorrt("building engines", f"emu-edge build-engines {bundle_path} --check checks the graphs "
                                              "without it.")
    for name in names:
        spec = bundle.manifest.graphs[name]
        model = onnx.load(str(bundle.graph_path(name)), load_external_data=False)
        problems += [str(p) for p in check_graph(model, spec.profiles, name)]
        plans[name] = plan_engine(name, spec.precision, precision, _tensorrt_major(trt))
    if problems:
        raise EngineBuildError("TensorRT cannot build these graphs:\n  " + "\n  ".join(problems))
    env = current_environment()
    cache = EngineCache(cache_dir)
    log(f"building {precision} engines of {bundle.path} with {env.describe()} into {cache.root}")
    entries = []
    for name in names:
        spec, plan = bundle.manifest.graphs[name], plans[name]
        log(f"  {name}: {plan.note}")
        engine = build_engine(bundle.graph_path(name), plan, spec.profiles, bundle.manifest.model,
                              cache.timing_cache_path(env), workspace_bytes, log)
        key = EngineKey.of(env, plan.precision, spec.sha256)
        entries.append(cache.add(key, engine, name, spec.profiles, {"bundle": str(bundle.path.resolve())}))
        log(f"  {name}: {len(engine) / 1e6:.1f} MB engine")
    return entries
