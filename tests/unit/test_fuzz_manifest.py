"""Fuzzing a real bundle: whatever its manifest or graph bytes say, `Bundle.open` and
`Pipeline.load` either load it correctly or refuse it with one of our errors; they never
fail with another exception type, and never read a file outside the bundle.

The mutations are generic (any key the fixture's manifest has, at any depth), so the test
follows the schema wherever it goes.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emu_edge.runtime import bundle as bundle_module
from emu_edge.runtime import pipeline as pipeline_module
from emu_edge.runtime.backends import BackendError
from emu_edge.runtime.bundle import Bundle, BundleError
from emu_edge.runtime.manifest import ManifestError
from emu_edge.runtime.pipeline import Pipeline

OURS = (BundleError, ManifestError, BackendError)
OUTSIDE = "outside"  # beside each fuzzed bundle: a copy of every bundle file
PATHS = ["../outside/decoder.onnx", "../outside/tokenizer.json", "/etc/passwd", "sub/../decoder.onnx",
         "./decoder.onnx", "..", ".", "", "decoder.onnx/", "..\\outside\\embed.onnx", "C:embed.onnx",
         "x" * 300, "decoder.onnx\x00", "tokenizer.json", "unet.onnx", "missing.onnx"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(PATHS), st.text(max_size=12),
    st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-5, max_value=300), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(min_value=-5, max_value=5), max_size=3),
)


def _key_paths(value, prefix=()) -> list[tuple]:
    """Every key and list index in a JSON tree, as paths from the root."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    paths = []
    for key, child in items:
        paths.append(prefix + (key,))
        paths += _key_paths(child, prefix + (key,))
    return paths


def _apply(manifest: dict, path: tuple, op: str, value) -> None:
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "wrap":  # the right value, one level too deep
        parent[last] = [parent[last]]
    else:
        parent[last] = value


class Original(tuple):
    """(bundle folder, its manifest, every key path in it); shown short in reports."""

    def __repr__(self) -> str:
        return f"Original({self[0]})"


@pytest.fixture(scope="module")
def original(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    return Original((tiny_bundle, manifest, _key_paths(manifest)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, original):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(original[0], root / OUTSIDE)
    return root


def _mutations(paths):
    ops = st.sampled_from(["set", "set", "delete", "wrap"])
    return st.lists(st.tuples(st.sampled_from(paths), ops, VALUES), min_size=1, max_size=3)


GRAPH_DAMAGE = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["decoder", "vision_encoder"]), st.sampled_from(["truncate", "flip", "prefix", "empty"]),
              st.integers(min_value=0, max_value=2**20), st.booleans()),
)


@st.composite
def cases(draw, paths):
    return draw(_mutations(paths)), draw(GRAPH_DAMAGE)


def _damage(data: bytes, how: str, at: int) -> bytes:
    at %= max(len(data), 1)
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:] if data else data
    if how == "prefix":
        return b"\x0a\xff\xff\xff\xff\x0f" + data
    return b""


def _build(root: Path, source: Path, manifest: dict, mutations, damage) -> Path:
    """A new bundle folder: the source's files hard-linked (cheap, and a link to a file
    inside the folder), the manifest mutated, and one graph damaged if asked."""
    folder = Path(tempfile.mkdtemp(dir=root))
    for path in source.iterdir():
        if path.name != "manifest.json":
            os.link(path, folder / path.name)
    manifest = json.loads(json.dumps(manifest))
    if damage is not None:
        graph, how, at, rehash = damage
        name = manifest["graphs"][graph]["file"]
        data = _damage((source / name).read_bytes(), how, at)
        (folder / name).unlink()
        (folder / name).write_bytes(data)
        if rehash:  # so the runtime goes on to parse the damaged graph
            manifest["graphs"][graph]["sha256"] = hashlib.sha256(data).hexdigest()
    for path, op, value in mutations:
        try:
            _apply(manifest, path, op, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced what this one meant to change
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


class Reads:
    """Every file the runtime hashes, opens or hands to onnxruntime, checked to lie in the
    bundle; and any Python-level open of a file in the outside copy."""

    def __init__(self, monkeypatch, root: Path):
        self.folder: Path | None = None
        self.outside = str(root / OUTSIDE)
        real_sha, real_backend = bundle_module.sha256_file, pipeline_module.create_backend
        real_tokenizer = Bundle._load_tokenizer
        real_open, real_io_open = builtins.open, io.open
        monkeypatch.setattr(bundle_module, "sha256_file", lambda path: real_sha(self.inside(path)))
        monkeypatch.setattr(pipeline_module, "create_backend",
                            lambda path, **kw: real_backend(self.inside(path), **kw))
        monkeypatch.setattr(Bundle, "_load_tokenizer", staticmethod(lambda path: real_tokenizer(self.inside(path))))
        monkeypatch.setattr(builtins, "open", lambda file, *a, **kw: real_open(self.not_outside(file), *a, **kw))
        monkeypatch.setattr(io, "open", lambda file, *a, **kw: real_io_open(self.not_outside(file), *a, **kw))

    def inside(self, path):
        resolved = Path(path).resolve()
        assert resolved.parent == self.folder.resolve(), f"read {path} outside the bundle {self.folder}"
        return path

    def not_outside(self, file):
        if isinstance(file, (str, os.PathLike)):
            assert not os.path.realpath(file).startswith(self.outside), f"opened {file} outside the bundle"
        return file


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_bundles_load_or_fail_cleanly(original, workdir, data):
    source, manifest, paths = original
    mutations, damage = data.draw(cases(paths))
    _check(source, manifest, workdir, mutations, damage)


@pytest.mark.parametrize("mutations", [
    [(("schema_version",), "set", True)],
    [(("model", "max_length"), "set", "256")],
    [(("model", "max_length"), "set", 10**30)],
    [(("graphs", "decoder", "file"), "set", "../outside/decoder.onnx")],
    [(("tokenizer",), "set", "../outside/tokenizer.json")],
])
def test_known_cases(original, workdir, mutations):
    source, manifest, _ = original
    _check(source, manifest, workdir, mutations, None)


def _check(source, manifest, workdir, mutations, damage):
    folder = _build(workdir, source, manifest, mutations, damage)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            reads = Reads(monkeypatch, workdir)
            reads.folder = folder
            try:
                bundle = Bundle.open(folder)
            except OURS:
                return
            # It opened: then it is a bundle as the runtime expects it, and it loads or is
            # refused cleanly.
            loaded = bundle.manifest
            assert type(loaded.schema_version) is int
            files = [loaded.tokenizer] + [f for g in loaded.graphs.values()
                                          for f in [g.file, *(e["file"] for e in g.external_data)]]
            for file in files:
                assert os.sep not in file and (folder / file).resolve().parent == folder.resolve(), file
            try:
                Pipeline.load(bundle)
            except OURS:
                pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)
