"""TensorRT: the engine cache, the TensorRT backend, and onnxruntime's TensorRT provider options.

Engines live outside bundles (bundles are immutable) in a cache folder whose index.json
keys each engine by what makes it valid:

    (TensorRT version, GPU name, compute capability, precision, ONNX sha256)

An engine built by another TensorRT version or for another GPU does not deserialize (or
worse, misbehaves), so a lookup that finds engines for the graph but none for this
TensorRT and GPU refuses with what was found and what to run, instead of crashing later.

    emu-edge build-engines BUNDLE --precision fp16      (emu_edge.export.tensorrt)
    Pipeline.load(BUNDLE, device="cuda", backend="tensorrt")

`tensorrt` and the CUDA bindings (`cuda-python`) are imported only when an engine is
built or run; the index logic needs neither.

The backend has the interface of the onnxruntime one (run, allocate, bind, run_bound),
with device buffers allocated once at the profile's largest shapes, execute_async_v3 on
one stream, and the repeated same-shape call of a decode step replayed as a CUDA graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emu_edge.runtime.backends import BackendError
from emu_edge.runtime.bundle import sha256_file

INDEX_FILE = "index.json"
INDEX_FORMAT = "emu-edge-engine-cache"
INDEX_VERSION = 1
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
ENV_CACHE = "EMU_EDGE_ENGINE_CACHE"
ENV_PRECISION = "EMU_EDGE_TRT_PRECISION"
# The runtime prefers the engine doing the least work when several were built.
PREFERENCE = ("int8", "fp16", "fp32")


class EngineCacheError(BackendError):
    """No usable engine: none built, or only for another TensorRT version or GPU."""


def engine_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    from emu_edge.runtime.shipped import cache_root

    return cache_root() / "engines"


@dataclass(frozen=True)
class Environment:
    """What an engine is tied to besides its graph."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str     # "8.7"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


@dataclass(frozen=True)
class EngineKey:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    onnx_sha256: str

    @classmethod
    def of(cls, env: Environment, precision: str, onnx_sha256: str) -> EngineKey:
        if precision not in ENGINE_PRECISIONS:
            raise ValueError(f"engine precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
        return cls(env.tensorrt_version, env.gpu_name, env.compute_capability, precision, onnx_sha256)

    @property
    def environment(self) -> Environment:
        return Environment(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def id(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class EngineCache:
    """A folder of serialized engines and timing caches with a JSON index."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else engine_cache_dir()

    # -- the index ---------------------------------------------------------------------------

    def _read(self) -> dict:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "engines": {}}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EngineCacheError(f"{path} is not valid JSON ({e}); delete the engine cache {self.root} and "
                                   "rebuild with emu-edge build-engines") from e
        if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
            raise EngineCacheError(f"{path} is not an {INDEX_FORMAT} v{INDEX_VERSION} index; delete {self.root} "
                                   "and rebuild with emu-edge build-engines")
        return index

    def _write(self, index: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a reader never sees half an index.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.root / INDEX_FILE)

    def entries(self) -> list[dict]:
        return list(self._read()["engines"].values())

    def add(self, key: EngineKey, engine: bytes, graph: str, profiles: dict | None = None,
            extra: dict | None = None) -> dict:
        """Store an engine (replacing one with the same key) and index it."""
        self.root.mkdir(parents=True, exist_ok=True)
        file = f"{graph}-{key.precision}-{key.id()}.engine"
        tmp = self.root / f".{file}.partial"
        tmp.write_bytes(engine)
        os.replace(tmp, self.root / file)
        entry = {**asdict(key), "id": key.id(), "graph": graph, "file": file,
                 "engine_sha256": hashlib.sha256(engine).hexdigest(), "profiles": profiles or {},
                 "built": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        index = self._read()
        index["engines"][key.id()] = entry
        self._write(index)
        return entry

    def get(self, key: EngineKey) -> dict | None:
        return self._read()["engines"].get(key.id())

    def engine_path(self, entry: dict) -> Path:
        path = self.root / entry["file"]
        if not path.is_file():
            raise EngineCacheError(f"the engine cache index lists {path}, which is missing; rebuild with "
                                   "emu-edge build-engines")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["engine_sha256"]:
            raise EngineCacheError(f"{path} does not match its sha256 in {self.root / INDEX_FILE}; rebuild with "
                                   "emu-edge build-engines")
        return path

    def select(self, onnx_sha256: str, env: Environment, graph: str, precision: str | None = None) -> dict:
        """The engine to run for a graph on this machine, or an error saying why there is none."""
        for_graph = [e for e in self.entries() if e["onnx_sha256"] == onnx_sha256]
        here = [e for e in for_graph if (e["tensorrt_version"], e["gpu_name"], e["compute_capability"])
                == (env.tensorrt_version, env.gpu_name, env.compute_capability)]
        if precision is not None:
            matching = [e for e in here if e["precision"] == precision]
        else:
            matching = sorted(here, key=lambda e: PREFERENCE.index(e["precision"]))
        if matching:
            return matching[0]
        if here:
            built = ", ".join(sorted({e["precision"] for e in here}))
            raise EngineCacheError(f"the engine cache {self.root} has {graph} engines in {built} for this machine "
                                   f"but not in {precision}; run emu-edge build-engines BUNDLE --precision "
                                   f"{precision}, or unset {ENV_PRECISION}")
        if for_graph:
            found = "; ".join(sorted({f"{e['precision']} for TensorRT {e['tensorrt_version']} on {e['gpu_name']} "
                                      f"(compute capability {e['compute_capability']})" for e in for_graph}))
            raise EngineCacheError(
                f"the {graph} engines in {self.root} were built for another machine or TensorRT ({found}); this "
                f"is {env.describe()}. Engines are specific to both: rebuild here with emu-edge build-engines BUNDLE")
        raise EngineCacheError(f"no TensorRT engine for the {graph} graph (onnx sha256 {onnx_sha256[:12]}...) in "
                               f"{self.root}; build them with emu-edge build-engines BUNDLE --precision fp16")

    def timing_cache_path(self, env: Environment) -> Path:
        tag = hashlib.sha256(json.dumps(asdict(env), sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"timing-{tag}.cache"


# -- TensorRT and CUDA, imported on demand ------------------------------------------------------


def import_tensorrt(purpose: str = "backend='tensorrt'", otherwise: str = "Use backend='onnxruntime' otherwise."):
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(
            f"{purpose} needs NVIDIA TensorRT's Python package (on a Jetson it comes with JetPack: "
            f"apt install python3-libnvinfer; on x86: pip install tensorrt) and a CUDA GPU. {otherwise}") from e
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart                   # older cuda-python
        except ImportError as e:
            raise BackendError("backend='tensorrt' needs the CUDA Python bindings: pip install cuda-python") from e
    return cudart


def _check(result):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def current_environment(device_id: int = 0) -> Environment:
    trt = import_tensorrt()
    cudart = import_cudart()
    props = _check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Environment(tensorrt_version=trt.__version__, gpu_name=name.strip("\x00 "),
                       compute_capability=f"{props.major}.{props.minor}")


class DeviceBuffer:
    """Device memory of a fixed capacity, holding an array of `shape`."""

    def __init__(self, cudart, shape, dtype, capacity: int | None = None, zeros: bool = False):
        self._cudart = cudart
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.capacity = max(capacity or 0, int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self.ptr = _check(cudart.cudaMalloc(self.capacity))
        if zeros:
            _check(cudart.cudaMemset(self.ptr, 0, self.capacity))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        _check(self._cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes,
                                       self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def __del__(self):
        try:
            self._cudart.cudaFree(self.ptr)
        except Exception:  # interpreter shutdown: the driver frees it anyway
            pass


class TensorRTBinding:
    """What DecoderSession binds: device buffers by name, and host arrays to copy in."""

    def __init__(self):
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, DeviceBuffer] = {}

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = np.ascontiguousarray(array) if np.ndim(array) else np.array(array)

    def bind_ortvalue_input(self, name: str, buffer: DeviceBuffer) -> None:
        self.inputs[name] = buffer

    def bind_ortvalue_output(self, name: str, buffer: DeviceBuffer) -> None:
        self.outputs[name] = buffer


class TensorRTBackend:
    """One engine from the cache, for one graph file of a bundle."""

    def __init__(self, path: str | Path, device_id: int = 0, cache: EngineCache | None = None,
                 precision: str | None = None):
        self.path = Path(path)
        self.device = "cuda"
        self.device_id = device_id
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        _check(cudart.cudaSetDevice(device_id))
        self.cache = cache or EngineCache()
        env = current_environment(device_id)
        graph = self.path.stem
        entry = self.cache.select(sha256_file(self.path), env, graph, precision or os.environ.get(ENV_PRECISION))
        self.entry = entry
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.cache.engine_path(entry).read_bytes())
        if self.engine is None:
            raise EngineCacheError(f"TensorRT {trt.__version__} could not deserialize {entry['file']} (built with "
                                   f"TensorRT {entry['tensorrt_version']}); rebuild with emu-edge build-engines")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        shapes = {n: [d if d >= 0 else f"dim{i}" for i, d in enumerate(self.engine.get_tensor_shape(n))]
                  for n in names}
        self.input_shapes = {n: shapes[n] for n in self.input_names}
        self.output_shapes = {n: shapes[n] for n in self.output_names}
        # Shape tensors (an int input whose value sizes other tensors) are read by TensorRT
        # from host memory when the call is enqueued.
        self._on_host = {n for n in self.input_names
                         if self.engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        self._host: dict[str, np.ndarray] = {}         # host copies of shape-tensor inputs
        self._staging: dict[str, DeviceBuffer] = {}    # device copies of host inputs, max profile size
        self._outputs: dict[str, DeviceBuffer] = {}    # outputs of run(), max size
        self._shadows: dict[int, DeviceBuffer] = {}    # second half of in-place (ping-pong) buffers
        self._graphs: dict[tuple, object] = {}         # CUDA graphs by call signature
        self._seen: set = set()
        # A captured graph would freeze a shape tensor's value (the decoder's total length).
        self._graphs_supported = not self._on_host
        self._allocate_at_max()

    def _allocate_at_max(self) -> None:
        """Staging and output buffers once, at the largest shapes the profile admits."""
        for name in self.input_names:
            if len(self.engine.get_tensor_shape(name)) == 0:
                max_shape = ()
            else:
                max_shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
            self.context.set_input_shape(name, max_shape)
            if name in self._on_host:
                self._host[name] = np.zeros(max_shape, self.dtypes[name])
                self.context.set_tensor_address(name, self._host[name].ctypes.data)
            else:
                self._staging[name] = DeviceBuffer(self._cudart, max_shape, self.dtypes[name], zeros=True)
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape, default=0) < 0:
                raise BackendError(f"{self.path.name}: output {name} has a data-dependent shape, which this backend "
                                   "does not allocate; run this graph with backend='onnxruntime'")
            self._outputs[name] = DeviceBuffer(self._cudart, shape, self.dtypes[name])

    # -- the onnxruntime-backend interface ---------------------------------------------------

    def allocate(self, shape, dtype=np.float32, zeros: bool = False) -> DeviceBuffer:
        return DeviceBuffer(self._cudart, shape, dtype, zeros=zeros)

    def bind(self) -> TensorRTBinding:
        return TensorRTBinding()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        binding = TensorRTBinding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_ortvalue_output(name, self._outputs[name])
        self._execute(binding, use_graph=False)
        return {name: self._outputs[name].numpy() for name in (outputs or self.output_names)}

    def run_bound(self, binding: TensorRTBinding) -> None:
        self._execute(binding, use_graph=True)

    # -- execution ---------------------------------------------------------------------------

    def _execute(self, binding: TensorRTBinding, use_graph: bool) -> None:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        addresses = {}
        for name, value in binding.inputs.items():
            if isinstance(value, DeviceBuffer):
                shape, addresses[name] = value.shape, value.ptr
            elif name in self._on_host:
                host = self._host[name] = np.array(value, dtype=self.dtypes[name], order="C")
                shape, addresses[name] = host.shape, host.ctypes.data
            else:
                value = np.asarray(value, dtype=self.dtypes[name])
                staging = self._staging[name]
                if value.nbytes > staging.capacity:
                    raise BackendError(f"{self.path.name}: input {name} of shape {list(value.shape)} exceeds the "
                                       "engine's profile; rebuild with larger profiles")
                _check(cudart.cudaMemcpyAsync(staging.ptr, value.ctypes.data, value.nbytes, h2d, self.stream))
                shape, addresses[name] = value.shape, staging.ptr
            self.context.set_input_shape(name, tuple(shape))
        for name, buffer in binding.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if int(np.prod(shape)) * buffer.dtype.itemsize > buffer.capacity:
                raise BackendError(f"{self.path.name}: output {name} of shape {list(shape)} does not fit its buffer")
            buffer.shape = shape
        # WAR: TensorRT does not promise that an output may alias an input, which the KV cache
        # contract asks (past and present bound to one buffer). The output goes to a shadow
        # buffer and the two are swapped after the call: the caller's handle then holds the
        # new cache, with no copy.
        swaps = []
        inputs_by_ptr = {v.ptr: v for v in binding.inputs.values() if isinstance(v, DeviceBuffer)}
        for name, buffer in binding.outputs.items():
            if buffer.ptr in inputs_by_ptr:
                shadow = self._shadows.get(id(buffer))
                if shadow is None:
                    shadow = self._shadows[id(buffer)] = DeviceBuffer(cudart, buffer.shape, buffer.dtype,
                                                                      capacity=buffer.capacity)
                addresses[name] = shadow.ptr
                swaps.append((buffer, shadow))
            else:
                addresses[name] = buffer.ptr
        for name, ptr in addresses.items():
            self.context.set_tensor_address(name, ptr)
        signature = (tuple(sorted((n, tuple(getattr(v, "shape", ()))) for n, v in binding.inputs.items())),
                     tuple(sorted(addresses.items())))
        if use_graph and self._graphs_supported:
            self._launch_graph(signature)
        elif not self.context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run {self.path.name}; see the TensorRT log above")
        _check(cudart.cudaStreamSynchronize(self.stream))
        for buffer, shadow in swaps:
            buffer.ptr, shadow.ptr = shadow.ptr, buffer.ptr

    def _launch_graph(self, signature) -> None:
        """Decode steps repeat one signature (shapes and addresses; the ping-pong buffers
        alternate between two): the first call of a signature runs normally, the second is
        captured as a CUDA graph, later ones replay it. Engines TensorRT cannot capture
        (data-dependent shapes) keep running normally."""
        cudart = self._cudart
        graph = self._graphs.get(signature)
        if graph is not None:
            _check(cudart.cudaGraphLaunch(graph, self.stream))
            return
        if signature not in self._seen:
            self._seen.add(signature)
            if not self.context.execute_async_v3(self.stream):
                raise BackendError(f"TensorRT failed to run {self.path.name}; see the TensorRT log above")
            return
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart.cudaStreamBeginCapture(self.stream, mode))
        ok = self.context.execute_async_v3(self.stream)
        err, captured = cudart.cudaStreamEndCapture(self.stream)
        if not ok or int(err) != 0:
            self._graphs_supported = False
            if not self.context.execute_async_v3(self.stream):
                raise BackendError(f"TensorRT failed to run {self.path.name}; see the TensorRT log above")
            return
        self._graphs[signature] = _check(cudart.cudaGraphInstantiate(captured, 0))
        _check(cudart.cudaGraphLaunch(self._graphs[signature], self.stream))


# -- onnxruntime's TensorRT execution provider -----------------------------------------------------


def ort_tensorrt_provider(path: str | Path, device_id: int = 0, cache: EngineCache | None = None) -> tuple[str, dict]:
    """("TensorrtExecutionProvider", options) for one graph of a bundle: engine and timing
    caches under the engine cache, the manifest's shape profiles, and FP16 or INT8 as the
    graph's precision says (an fp32 graph stays fp32)."""
    path = Path(path)
    root = (cache or EngineCache()).root / "onnxruntime"
    options = {"device_id": str(device_id), "trt_engine_cache_enable": "True",
               "trt_engine_cache_path": str(root), "trt_timing_cache_enable": "True",
               "trt_timing_cache_path": str(root)}
    spec = _graph_spec(path)
    if spec is not None:
        if spec.precision == "fp16":
            options["trt_fp16_enable"] = "True"
        elif spec.precision == "int8":
            # QDQ graphs: explicit quantization, with FP16 for what is left in float.
            options.update(trt_int8_enable="True", trt_fp16_enable="True")
        if spec.profiles:
            for key, trt_key in (("min", "trt_profile_min_shapes"), ("opt", "trt_profile_opt_shapes"),
                                 ("max", "trt_profile_max_shapes")):
                options[trt_key] = ",".join(f"{name}:{'x'.join(str(d) for d in p[key])}"
                                            for name, p in spec.profiles.items())
    return "TensorrtExecutionProvider", options


def _graph_spec(path: Path):
    from emu_edge.runtime.manifest import MANIFEST_FILE, Manifest, ManifestError

    if not (path.parent / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = Manifest.load(path.parent)
    except ManifestError:
        return None
    return next((g for g in manifest.graphs.values() if g.file == path.name), None)
