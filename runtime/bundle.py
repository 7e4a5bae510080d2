"""Opening a bundle folder: manifest, graph files, tokenizer, all checked up front.

Every problem is reported when the bundle is opened, naming the file and what to do,
rather than as an onnxruntime error halfway through a generation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from emu_edge.runtime.manifest import MANIFEST_FILE, GraphSpec, Manifest, ManifestError


class BundleError(RuntimeError):
    pass


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_size(path: str | Path) -> int:
    """Bytes of every file under a folder (a bundle, a checkpoint)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def version_key(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())  # "1.20.0rc1" -> 1, 20, 0
        parts.append(int(digits or 0))
    return tuple(parts)


def overlap(a: str | Path, b: str | Path) -> bool:
    """Whether two folders are the same or one lies inside the other: writing one as a new
    output would then replace, or bury itself in, the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def sealed_path(root: Path, key: str, name: str) -> Path:
    """The file a manifest key names, refused unless it is a plain file name inside the
    bundle folder (bundles are sealed): an edited manifest must not make the runtime hash,
    load or copy a file from elsewhere."""
    plain = (name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
             and not PureWindowsPath(name).drive)
    path = root / name
    try:
        if plain and path.is_symlink():
            plain = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:  # a name too long, a link loop
        raise BundleError(f"{root / MANIFEST_FILE}: {key} is {name!r}, which cannot be opened: {e}") from e
    if not plain:
        raise BundleError(
            f"{root / MANIFEST_FILE}: {key} is {name!r}, a path that leaves the bundle; every file a manifest "
            "names must be a plain file name inside the bundle folder (no folders, '..', absolute paths or links "
            "out of it). The manifest was edited by hand or by another tool: re-export the bundle.")
    return path


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    tokenizer: object  # tokenizers.Tokenizer

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, onnxruntime_version: str | None = "installed") -> Bundle:
        """Read and check a bundle. verify=False skips hashing the graph files (large
        bundles); onnxruntime_version=None skips the version check (no onnxruntime here)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle folder {path} does not exist")
        if not (path / MANIFEST_FILE).is_file():
            raise BundleError(f"{path} has no {MANIFEST_FILE}; is it a bundle folder (written by emu-edge export)?")
        try:
            manifest = Manifest.load(path / MANIFEST_FILE)
        except ManifestError as e:
            raise BundleError(str(e)) from e
        # Every path is checked before any file is hashed or read.
        for key, file in cls._files(manifest):
            sealed_path(path, key, file)
        for name, graph in manifest.graphs.items():
            cls._check_files(path, name, graph, verify)
        if onnxruntime_version == "installed":
            from emu_edge.runtime.backends import onnxruntime_version as installed

            onnxruntime_version = installed()
        if onnxruntime_version is not None:
            for name, graph in manifest.graphs.items():
                if version_key(onnxruntime_version) < version_key(graph.min_onnxruntime):
                    raise BundleError(
                        f"{graph.file} (IR {graph.ir_version}, opset {graph.opset}, domains "
                        f"{', '.join(graph.domains)}) needs onnxruntime >= {graph.min_onnxruntime}; "
                        f"onnxruntime {onnxruntime_version} is installed. Upgrade onnxruntime, or re-export "
                        "with --attention standard if the decoder is what needs the newer version.")
        return cls(path=path, manifest=manifest, tokenizer=cls._load_tokenizer(path / manifest.tokenizer))

    @staticmethod
    def _files(manifest: Manifest) -> list[tuple[str, str]]:
        """(manifest key, file name) of every file the manifest names."""
        files = [("tokenizer", manifest.tokenizer)]
        for name, graph in manifest.graphs.items():
            files.append((f"graphs.{name}.file", graph.file))
            files += [(f"graphs.{name}.external_data[{i}].file", e["file"]) for i, e in enumerate(graph.external_data)]
        return files

    @staticmethod
    def _check_files(root: Path, name: str, graph: GraphSpec, verify: bool) -> None:
        files = [(graph.file, graph.sha256)] + [(e["file"], e["sha256"]) for e in graph.external_data]
        for file, sha256 in files:
            file_path = root / file
            if not file_path.is_file():
                raise BundleError(f"{file_path} (graph {name!r}) is missing from the bundle; re-export it")
            if verify and sha256_file(file_path) != sha256:
                raise BundleError(
                    f"{file_path} does not match the sha256 recorded in {MANIFEST_FILE}: the file was "
                    "changed or corrupted after export. Re-export the bundle (bundles are immutable; "
                    "quantizing writes a new one).")

    @staticmethod
    def _load_tokenizer(path: Path):
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; re-export it")
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise BundleError(f"{path} is not a readable tokenizer.json: {e}") from e

    def graph_path(self, name: str) -> Path:
        if name not in self.manifest.graphs:
            raise BundleError(f"the bundle at {self.path} has no {name!r} graph "
                              f"(it has {', '.join(self.manifest.graphs)})")
        return self.path / self.manifest.graphs[name].file

    def has_graph(self, name: str) -> bool:
        return name in self.manifest.graphs
