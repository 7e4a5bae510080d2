"""One backend object per graph, behind one small interface.

    backend.run(feeds) -> {output name: numpy array}
    backend.allocate(shape, dtype)  -> a device buffer (OrtValue) that stays put
    backend.bind() / backend.run_bound(binding)  for graphs whose buffers live on the device

onnxruntime is imported here and only here, so a missing install is reported once, with
the extra to install.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEVICES = ("cpu", "cuda")
BACKENDS = ("onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    pass


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(
            "onnxruntime is not installed: pip install 'emu-edge[cpu]' (or 'emu-edge[gpu]' for CUDA; "
            "on a Jetson use the platform's onnxruntime-gpu wheel)") from e
    return onnxruntime


def onnxruntime_version() -> str:
    return import_onnxruntime().__version__


class OnnxBackend:
    """An onnxruntime InferenceSession for one graph on one device."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, device_id: int = 0,
                 spin: bool = True):
        ort = import_onnxruntime()
        if device not in DEVICES:
            raise BackendError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(
                    "device='cuda' needs onnxruntime's CUDAExecutionProvider, but this onnxruntime "
                    f"({ort.__version__}) offers only {', '.join(available)}. Install 'emu-edge[gpu]' "
                    "(onnxruntime-gpu, not alongside onnxruntime) or use device='cpu'.")
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
            if "TensorrtExecutionProvider" in available and os.environ.get("EMU_EDGE_ORT_TENSORRT", "1") != "0":
                # TensorRT first where it can take the graph, engines and timings cached.
                from emu_edge.runtime.tensorrt import ort_tensorrt_provider

                providers.insert(0, ort_tensorrt_provider(path, device_id))
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            # Worker threads sleep between operators instead of spinning: a server shares the
            # cores with its HTTP workers and other requests, and spinning burns what they need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.device = device
        self.device_id = device_id
        self._ort = ort
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            # onnxruntime's errors (InvalidProtobuf, Fail, InvalidGraph, ...) share no base
            # class but Exception, so they are told apart by their module; the message of
            # one about a damaged graph can quote bytes that are not UTF-8, and then arrives
            # as a UnicodeDecodeError instead.
            if not (type(e).__module__.startswith("onnxruntime") or isinstance(e, UnicodeDecodeError)):
                raise
            raise BackendError(f"onnxruntime cannot load {path}: {e}. The graph file is damaged or is not an "
                               "ONNX graph; re-export the bundle.") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Declared shapes: ints for fixed dims, strings for symbolic ones.
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.output_shapes = {o.name: o.shape for o in self.session.get_outputs()}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    # -- buffers that stay on the device -----------------------------------------------------

    def allocate(self, shape, dtype=np.float32, zeros: bool = False):
        """A buffer on this backend's device, allocated once by the caller; uninitialised
        unless zeros=True."""
        if zeros:
            # On the CPU the OrtValue wraps (and keeps alive) the numpy memory; on a GPU it
            # is copied over once.
            return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, self.device_id)
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def bind(self):
        return self.session.io_binding()

    def run_bound(self, binding) -> None:
        if self.device == "cpu":
            # Nothing to synchronise with host memory; a decode step is short enough that
            # the two extra calls showed.
            self.session.run_with_iobinding(binding)
            return
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()


def create_backend(path: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                   threads: int | None = None, device_id: int = 0, spin: bool = True) -> OnnxBackend:
    """spin: onnxruntime's CPU worker threads spin between operators (faster for one stream,
    CPU other work on the machine then lacks)."""
    if backend == "onnxruntime":
        return OnnxBackend(path, device=device, threads=threads, device_id=device_id, spin=spin)
    if backend == "tensorrt":
        if device != "cuda":
            raise BackendError("backend='tensorrt' runs on the GPU: use device='cuda' (or backend='onnxruntime')")
        from emu_edge.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(path, device_id=device_id)
    raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
