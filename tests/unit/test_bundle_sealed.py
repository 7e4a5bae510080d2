"""Bundles are sealed: no manifest path leads out of the folder, and wrong types in the
manifest are refused on open, naming the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from emu_edge.runtime import bundle as bundle_module
from emu_edge.runtime.bundle import Bundle, BundleError
from emu_edge.runtime.pipeline import Pipeline


@pytest.fixture
def sealed(tiny_bundle, tmp_path):
    """A copy of the tiny bundle, and beside it `outside/` holding a copy of every bundle
    file: a manifest pointing there would find files that pass every other check."""
    inside = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, inside)
    shutil.copytree(tiny_bundle, tmp_path / "outside")
    return inside


def _edit(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("key, value", [
    ("graphs.decoder.file", "../outside/decoder.onnx"),
    ("graphs.decoder.file", "ABSOLUTE"),
    ("graphs.decoder.file", "sub/decoder.onnx"),
    ("graphs.unet.file", "..\\outside\\unet.onnx"),
    ("graphs.unet.file", ".."),
    ("tokenizer", "../outside/tokenizer.json"),
    ("tokenizer", "ABSOLUTE"),
])
def test_manifest_paths_that_leave_the_bundle_are_refused(sealed, monkeypatch, key, value):
    (sealed / "sub").mkdir()  # a folder inside the bundle is still not a plain file name
    shutil.copy(sealed / "decoder.onnx", sealed / "sub" / "decoder.onnx")

    def change(manifest):
        *parents, last = key.split(".")
        target = manifest
        for part in parents:
            target = target[part]
        target[last] = str(sealed.parent / "outside" / target[last]) if value == "ABSOLUTE" else value

    _edit(sealed, change)
    hashed = []
    real_sha = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(Path(path)) or real_sha(path))
    with pytest.raises(BundleError, match=rf"{key.replace('.', '[.]')} is .* a path that leaves the bundle"):
        Bundle.open(sealed)
    assert hashed == [], "a file was hashed before the manifest's paths were checked"


def test_external_data_paths_are_sealed_too(sealed):
    _edit(sealed, lambda m: m["graphs"]["decoder"]["external_data"].append(
        {"file": "../outside/decoder.onnx", "sha256": m["graphs"]["decoder"]["sha256"]}))
    with pytest.raises(BundleError, match=r"graphs\.decoder\.external_data\[0\]\.file .* leaves the bundle"):
        Bundle.open(sealed)


def test_a_link_out_of_the_bundle_is_refused_and_one_inside_is_not(sealed):
    (sealed / "decoder.onnx").unlink()
    (sealed / "decoder.onnx").symlink_to(sealed.parent / "outside" / "decoder.onnx")
    with pytest.raises(BundleError, match=r"graphs\.decoder\.file is 'decoder\.onnx', a path that leaves"):
        Bundle.open(sealed)
    (sealed / "decoder.onnx").unlink()
    (sealed / "decoder.graph").write_bytes((sealed.parent / "outside" / "decoder.onnx").read_bytes())
    (sealed / "decoder.onnx").symlink_to("decoder.graph")
    assert Bundle.open(sealed).graph_path("decoder").read_bytes() == (sealed / "decoder.graph").read_bytes()


def test_schema_version_true_is_not_version_1(sealed):
    _edit(sealed, lambda m: m.update(schema_version=True))
    with pytest.raises(BundleError, match="schema_version true; this runtime reads schema version"):
        Bundle.open(sealed)


@pytest.mark.parametrize("value, shown", [("256", '"256" (string)'), (True, "true (boolean)"),
                                          (256.0, "256.0 (number)"), (-1, "-1 (integer)")])
def test_a_non_integer_max_length_is_named_on_open(sealed, value, shown):
    # It used to open, and Pipeline.load then failed with a bare TypeError.
    _edit(sealed, lambda m: m["model"].update(max_length=value))
    with pytest.raises(BundleError, match=rf"model\.max_length must be int .*got {re.escape(shown)}"):
        Pipeline.load(sealed)


def test_types_inside_containers_are_checked(sealed):
    _edit(sealed, lambda m: m["model"]["prompt"]["tokens"].update({"<image>": False}))
    with pytest.raises(BundleError, match=r"model\.prompt: prompt layout tokens must map token names to ids"):
        Bundle.open(sealed)
    _edit(sealed, lambda m: (m["model"]["prompt"]["tokens"].update({"<image>": 5}),
                             m["graphs"]["decoder"]["names"].update({"logits": 3})))
    with pytest.raises(BundleError, match=r"graphs\.decoder\.names must be dict\[str, str\]"):
        Bundle.open(sealed)
