"""Packaging and the dependency direction of DESIGN.md."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ["emu_edge", "emu_edge/data", "emu_edge/training", "emu_edge/export",
               "emu_edge/calibration", "emu_edge/runtime", "emu_edge/runtime/families"]
FOLDERS = {"emu_edge/data": "emu_edge/data", "emu_edge/training": "training", "emu_edge/export": "export",
           "emu_edge/calibration": "calibration", "emu_edge/runtime": "runtime",
           "emu_edge/runtime/families": "runtime/families"}

# package folder -> modules it must never import (DESIGN.md, "Dependency direction")
FORBIDDEN = {
    "emu_edge/data": ("torch", "transformers", "diffusers", "onnxruntime", "onnx", "emu_edge.training",
                      "emu_edge.export", "emu_edge.runtime", "emu_edge.calibration"),
    "runtime": ("torch", "transformers", "diffusers", "safetensors", "onnx", "emu_edge.training",
                "emu_edge.export", "emu_edge.calibration"),
    # Calibration writes its bundles with the exporter's torch-free BundleWriter (one writer,
    # one manifest path); nothing else of export, which needs torch.
    "calibration": ("torch", "transformers", "diffusers", "emu_edge.training", "emu_edge.export.cli",
                    "emu_edge.export.hf_cli", "emu_edge.export.decoder", "emu_edge.export.vision",
                    "emu_edge.export.unet", "emu_edge.export.embed"),
    "training": ("emu_edge.export", "emu_edge.calibration"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_dependency_direction(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            for banned in FORBIDDEN[folder]:
                # onnx is banned in the runtime, onnxruntime is not: compare whole dotted parts.
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_bare_folder_imports():
    bare = ("runtime", "training", "export", "calibration", "benchmarks")
    bad = [f"{p.relative_to(ROOT)}: import {n}" for folder in ("emu_edge", *bare, "tests") if (ROOT / folder).exists()
           for p in (ROOT / folder).rglob("*.py") for n in _imports(p) if n.split(".")[0] in bare]
    assert not bad, "\n".join(bad)


def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("emu_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES:
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel"
    # Every module of every mapped folder is in the wheel (a module left out of the mapping
    # would still import in an editable install and vanish from the wheel).
    for pkg, folder in FOLDERS.items():
        for py in (ROOT / folder).glob("*.py"):
            assert f"{pkg}/{py.name}" in names, f"{folder}/{py.name} missing from the wheel"
    assert "emu_edge/data/digits.npz" in names
    assert not any(n.split("/")[0] in ("runtime", "training", "export", "calibration") for n in names)


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import emu_edge.runtime, emu_edge.data, emu_edge.cli;"
            "import emu_edge.runtime.pipeline, emu_edge.export.bundle_writer;"
            # every family module: Pipeline.load imports the bundle's one on first use
            "from emu_edge.runtime.families import FAMILIES, family_class; [family_class(f) for f in FAMILIES]")
    subprocess.run([sys.executable, "-c", code], check=True)


# Training shares only the runtime's torch-free prompt, scheduler and judge modules (the
# sequences it trains on are the ones the runtime builds; DESIGN.md, "Dependency direction"),
# and runtime.bundle's folder helpers (overlap(): an output folder is not an input; bundle_size()).
TRAINING_MAY_IMPORT_FROM_RUNTIME = {"emu_edge.runtime.prompt", "emu_edge.runtime.schedulers",
                                    "emu_edge.runtime.judge", "emu_edge.runtime.bundle"}


def test_training_imports_only_the_shared_runtime_modules():
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in sorted((ROOT / "training").rglob("*.py"))
           for n in _imports(p) if n.startswith("emu_edge.runtime") and n not in TRAINING_MAY_IMPORT_FROM_RUNTIME]
    assert not bad, "\n".join(bad)


def test_public_api_is_one_import_away_and_import_stays_light():
    code = ("import sys; import emu_edge; "
            "assert not any(m.startswith(('numpy', 'onnxruntime', 'emu_edge.runtime')) for m in sys.modules); "
            "from emu_edge import Pipeline; from emu_edge.runtime import Pipeline as P; assert Pipeline is P; "
            "print(Pipeline.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "emu_edge.runtime.pipeline"
