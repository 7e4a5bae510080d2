"""Writes a bundle folder: graphs, tokenizer.json and manifest.json.

Everything goes into a hidden sibling folder first and is renamed into place by
`finish()`, so a failed export leaves no half bundle behind (and what a killed one left,
`.NAME.partial-PID` and `.NAME.old-PID` of a dead process, goes on the next write to the
same folder). `overwrite` replaces only a bundle (a folder holding manifest.json) or an
empty folder, and never a folder the bundle is made from. Each graph is checked
(onnx.checker with full shape inference) and described in the manifest from the saved
file itself: hash, I/O, operator domains, IR/opset and the oldest onnxruntime that runs it.

A graph whose initializers exceed `external_data_threshold` (2 GB, protobuf's limit) keeps
them in `NAME.onnx.data` beside it (ONNX external data). The decoder graph is
built straight into that file (`spill(name)`, a DataFile given to their GraphBuilder), so
export memory is a tensor or two rather than the whole float32 decoder; a graph that
turns out small enough is read back into one file, the same bytes as built in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from emu_edge.runtime.bundle import overlap, sha256_file, version_key
from emu_edge.runtime.manifest import (MANIFEST_FILE, SCHEMA_VERSION, GraphSpec, IOSpec, Manifest,
                                       ModelSpec)

TWO_GB = 2 * 1024**3
# What a DataFile takes: initializers of at least SPILL_MIN_BYTES (onnx.save_model's
# size_threshold), each at an offset that is a multiple of DATA_ALIGNMENT (a page, so
# onnxruntime can memory-map it; onnx allows up to 64 KiB), written in blocks of about
# BLOCK_BYTES so that a transposed view is never copied whole.
SPILL_MIN_BYTES = 1024
DATA_ALIGNMENT = 4096
BLOCK_BYTES = 64 * 1024**2
BASE_ONNXRUNTIME = "1.16"
# First onnxruntime release that reads each ONNX IR version / default-domain opset.
_ORT_FOR_IR = {9: "1.16", 10: "1.18"}
_ORT_FOR_OPSET = {19: "1.16", 20: "1.17", 21: "1.18"}
# Contrib operators and the first release whose CPU kernel does what our graphs ask of
# them. GroupQueryAttention (float, packed QKV, do_rotary with cos/sin caches) loads from
# 1.18, but 1.18 and 1.19 compute a multi-token continuation on a non-empty cache wrongly
# (checked against PyTorch: 6e-3 logit error, no error raised); 1.20 gets it right.
MIN_ONNXRUNTIME_FOR_OPS = {
    ("com.microsoft", "GroupQueryAttention"): "1.20",
    # 4-bit weights: onnxruntime 1.16.3 refuses the op, 1.17.3 runs it.
    ("com.microsoft", "MatMulNBits"): "1.17",
    # Residual add + RMSNorm ("gqa" decoders), float32: 1.20.0 runs it and matches 1.31
    # (checked); float16 below.
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): "1.20",
    # 4-bit token tables (UINT4 codes and zero points): 1.20.1 runs them (checked).
    ("com.microsoft", "GatherBlockQuantized"): "1.20.1",
}
# Kernels that came later than their operator, for some of its attributes or types:
# (domain, op) -> (does this node need it, version).
# - MatMulNBits' 8-bit CPU kernel ships from 1.22; the op schema does not tell the width.
# - SkipSimplifiedLayerNormalization in float16 fails in 1.20.0 (prepacked gamma reported
#   missing, onnxruntime issue 22704) and runs from 1.20.1.
_MIN_ONNXRUNTIME_FOR_VARIANTS = {
    ("com.microsoft", "MatMulNBits"): (
        lambda node, dtypes: any(a.name == "bits" and a.i == 8 for a in node.attribute), "1.22"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (
        lambda node, dtypes: dtypes.get(node.input[2]) == onnx.TensorProto.FLOAT16, "1.20.1"),
}


class BundleWriteError(RuntimeError):
    pass


def _present_names(names: dict[str, str], model: onnx.ModelProto) -> dict[str, str]:
    """A spec's role-to-tensor names restricted to the tensors this graph has (a text-only
    decoder has no image_embeds, a decoder without regression head no regressed)."""
    tensors = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    return {key: name for key, name in names.items()
            if (name.format(layer=0) if "{layer}" in name else name) in tensors}


def min_onnxruntime_for(model: onnx.ModelProto) -> str:
    """The oldest onnxruntime that loads and runs this graph as intended."""
    needed = [BASE_ONNXRUNTIME]
    opset = _default_opset(model)
    if model.ir_version > max(_ORT_FOR_IR) or opset > max(_ORT_FOR_OPSET):
        raise BundleWriteError(
            f"graph {model.graph.name!r} has IR version {model.ir_version} and opset {opset}; bundles "
            f"target IR <= {max(_ORT_FOR_IR)} and opset <= {max(_ORT_FOR_OPSET)} so that the onnxruntime "
            "on the devices can read them (set model.ir_version and the opset explicitly)")
    needed.append(_ORT_FOR_IR.get(model.ir_version, BASE_ONNXRUNTIME))
    needed.append(_ORT_FOR_OPSET.get(opset, BASE_ONNXRUNTIME))
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        key = (node.domain, node.op_type)
        version = MIN_ONNXRUNTIME_FOR_OPS.get(key)
        if version:
            needed.append(version)
            applies, later = _MIN_ONNXRUNTIME_FOR_VARIANTS.get(key, (None, None))
            if applies is not None and applies(node, dtypes):
                needed.append(later)
        elif node.domain not in ("", "ai.onnx"):
            raise BundleWriteError(
                f"graph {model.graph.name!r} uses {node.domain}.{node.op_type}, whose minimum onnxruntime "
                "version is not recorded; add it to MIN_ONNXRUNTIME_FOR_OPS")
    return max(needed, key=version_key)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _io_specs(values) -> list[IOSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim]
        specs.append(IOSpec(name=v.name, dtype=dtype, shape=shape))
    return specs


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


class DataFile:
    """A graph's external data file, written while the graph is built: `tensor(name, array)`
    appends the array's bytes and returns a TensorProto that points at them (data_location
    EXTERNAL; location, offset, length), so the proto in memory stays small."""

    min_bytes = SPILL_MIN_BYTES

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.size = 0          # bytes in the file, alignment padding included
        self.data_bytes = 0    # tensor bytes only

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            raise BundleWriteError(f"initializer {name!r}: only numeric arrays of rank >= 1 go to external data, "
                                   f"got {array.dtype} of shape {array.shape}")
        offset = -(-self.size // DATA_ALIGNMENT) * DATA_ALIGNMENT
        self.file.write(bytes(offset - self.size))
        dtype = array.dtype.newbyteorder("<")   # ONNX raw data is little-endian
        rows = max(1, BLOCK_BYTES * len(array) // max(array.nbytes, 1))
        for start in range(0, len(array), rows):   # C order, block by block along axis 0
            self.file.write(np.ascontiguousarray(array[start:start + rows], dtype=dtype).data)
        self.size = offset + array.nbytes
        self.data_bytes += array.nbytes
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()   # onnx's keys, in its order
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        self.file.close()

    def single_file(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of the model with its tensors read back in, to be saved as one file: their
        fields as numpy_helper.from_array makes them (cleared, not set to defaults), so the
        file holds the bytes an in-memory build saves. A copy, not the model itself: protobuf
        frees a message's memory only with the whole message."""
        single = onnx.ModelProto()
        single.CopyFrom(model)
        with open(self.path, "rb") as f:
            for tensor in single.graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                f.seek(int(info["offset"]))
                tensor.raw_data = f.read(int(info["length"]))
                tensor.ClearField("external_data")
                tensor.ClearField("data_location")
        return single


def _check_locations(name: str, model: onnx.ModelProto, data: DataFile | None) -> None:
    """Every external tensor must be in this graph's own data file."""
    expected = data.path.name if data is not None else None
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location != expected:
                raise BundleWriteError(
                    f"graph {name!r}: initializer {tensor.name!r} is external data in {location!r}, not in the "
                    f"file this writer made for it ({expected!r}); build it with spill=writer.spill({name!r})")


def _remove_stale(out: Path) -> None:
    """Remove the temp folders (.NAME.partial-PID, .NAME.old-PID) that a killed writer of
    `out` left; those of a live process are its work in progress and stay."""
    for path in out.parent.iterdir():
        head, _, pid = path.name.rpartition("-")
        if head not in (f".{out.name}.partial", f".{out.name}.old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


class BundleWriter:
    """with BundleWriter(out) as writer: writer.add_graph(...); writer.write_tokenizer(...);
    writer.finish(model_spec). Leaving the block without finish() removes the temp folder.
    sources: the folders the bundle is made from; `out` must not overlap any of them."""

    def __init__(self, out: str | Path, overwrite: bool = False, external_data_threshold: int = TWO_GB,
                 log=print, sources=()):
        self.out = Path(out).resolve()
        for source in sources:
            if overlap(self.out, source):
                raise BundleWriteError(
                    f"--out {self.out} overlaps the input {Path(source).resolve()} (the same folder, or one inside "
                    "the other): writing it would replace or change what is being read. Choose a separate --out.")
        if self.out.exists() and not overwrite:
            raise BundleWriteError(f"{self.out} already exists; choose another --out or pass --overwrite")
        if self.out.exists() and not self.out.is_dir():
            raise BundleWriteError(f"{self.out} exists and is not a folder")
        if self.out.exists() and not (self.out / MANIFEST_FILE).is_file() and any(self.out.iterdir()):
            raise BundleWriteError(
                f"{self.out} is not an emu-edge bundle (it has no {MANIFEST_FILE}), and --overwrite replaces only a "
                "bundle; choose another --out, or move the folder away yourself")
        self.overwrite = overwrite
        self.external_data_threshold = external_data_threshold
        self.log = log
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.graphs: dict[str, GraphSpec] = {}
        self.data_files: dict[str, DataFile] = {}
        self.tokenizer_file: str | None = None
        self.finished = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self.abort()

    def abort(self) -> None:
        for data in self.data_files.values():
            data.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spill(self, name: str) -> DataFile:
        """The data file of graph `name`, for its GraphBuilder; add_graph(name, ...) keeps it
        or reads it back into the graph."""
        if name in self.graphs or name in self.data_files:
            raise BundleWriteError(f"graph {name!r} was already added or is being built")
        self.data_files[name] = DataFile(self.tmp / f"{name}.onnx.data")
        return self.data_files[name]

    def add_graph(self, name: str, model: onnx.ModelProto, spec=None, precision: str = "fp32",
                  profiles: dict | None = None, dynamic_axes: dict | None = None,
                  extra: dict | None = None, role: str | None = None, names: dict | None = None,
                  precisions: list[str] | None = None) -> GraphSpec:
        """spec: the network's export spec (export/specs.py), which gives the role, names,
        allowed precisions and profiles. Without one (a graph copied from another bundle),
        role, names and precisions come from the caller."""
        if name in self.graphs:
            raise BundleWriteError(f"graph {name!r} was already added")
        if spec is not None:
            role, names, precisions = spec.role, _present_names(spec.names, model), spec.precisions
            profiles = spec.profiles() if profiles is None else profiles
        elif role is None or names is None or precisions is None:
            raise BundleWriteError(f"graph {name!r}: pass its export spec, or its role, names and precisions")
        file = f"{name}.onnx"
        path = self.tmp / file
        min_ort = min_onnxruntime_for(model)
        data = self.data_files.pop(name, None)
        _check_locations(name, model, data)
        external = []
        if data is not None:
            data.close()
            if data.data_bytes + _initializer_bytes(model) > self.external_data_threshold:
                onnx.save_model(model, path)   # the tensors are in the data file already
                external.append({"file": data.path.name, "sha256": sha256_file(data.path)})
            else:
                onnx.save_model(data.single_file(model), path)
                data.path.unlink()
        elif _initializer_bytes(model) > self.external_data_threshold:
            data_file = f"{file}.data"
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file, size_threshold=SPILL_MIN_BYTES)
            external.append({"file": data_file, "sha256": sha256_file(self.tmp / data_file)})
        else:
            onnx.save_model(model, path)
        # The path form also covers external data; full_check runs strict shape inference.
        onnx.checker.check_model(str(path), full_check=True)
        domains = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        if dynamic_axes is None:
            dynamic_axes = {}
            for v in list(model.graph.input) + list(model.graph.output):
                axes = {i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param}
                if axes:
                    dynamic_axes[v.name] = axes
        entry = GraphSpec(
            role=role, file=file, sha256=sha256_file(path), precision=precision,
            inputs=_io_specs(model.graph.input), outputs=_io_specs(model.graph.output),
            ir_version=model.ir_version, opset=_default_opset(model), domains=domains,
            min_onnxruntime=min_ort, dynamic_axes=dynamic_axes, profiles=profiles or {},
            external_data=external, extra=extra or {},
            names=dict(names), precisions=list(precisions),
        )
        self.graphs[name] = entry
        size = path.stat().st_size + sum((self.tmp / e["file"]).stat().st_size for e in external)
        self.log(f"  {file}: {size / 1e6:.1f} MB, {precision}, onnxruntime >= {min_ort}")
        return entry

    def write_tokenizer(self, source) -> None:
        """Copy a tokenizer.json, or save a `tokenizers.Tokenizer`."""
        target = self.tmp / "tokenizer.json"
        if isinstance(source, (str, Path)):
            shutil.copyfile(source, target)
        else:
            source.save(str(target))
        self.tokenizer_file = "tokenizer.json"

    def finish(self, model: ModelSpec) -> Path:
        if self.tokenizer_file is None:
            raise BundleWriteError("no tokenizer was written; call write_tokenizer() before finish()")
        if self.data_files:
            raise BundleWriteError(f"graph(s) {', '.join(self.data_files)} were built into a data file but never "
                                   "added; call add_graph() for each")
        manifest = Manifest(schema_version=SCHEMA_VERSION, graphs=dict(self.graphs), model=model,
                            tokenizer=self.tokenizer_file)
        # Round-trip through the loader so a bundle the runtime would refuse is never written.
        manifest = Manifest.from_dict(manifest.to_dict(), MANIFEST_FILE)
        manifest.save(self.tmp / MANIFEST_FILE)
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        self.finished = True
        return self.out
