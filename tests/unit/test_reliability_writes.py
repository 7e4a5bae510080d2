"""No destructive surprises: writers never replace their inputs or a folder that is not
theirs, and clean what a killed writer left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from emu_edge.cli import main
from emu_edge.export.bundle_writer import BundleWriter


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy, ignore=shutil.ignore_patterns("steps"))
    return copy


@pytest.mark.parametrize("out", [".", "bundle", ".."])
def test_export_never_writes_over_or_into_its_checkpoint(checkpoint, capsys, out):
    before = _tree(checkpoint.parent)
    assert main(["export", str(checkpoint), "--out", str(checkpoint / out), "--overwrite"]) == 1
    assert "overlaps the input" in capsys.readouterr().err
    assert _tree(checkpoint.parent) == before


def test_export_hf_never_writes_over_its_inputs(llm_folders, tmp_path, capsys):
    llm = tmp_path / "llm"
    shutil.copytree(llm_folders("gqa"), llm)
    before = _tree(llm)
    assert main(["export-hf", "--llm", str(llm), "--out", str(llm), "--overwrite"]) == 1
    assert "overlaps the input" in capsys.readouterr().err
    assert _tree(llm) == before


def test_quantize_never_writes_into_its_bundle(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert main(["quantize", str(bundle), "--graph", "decoder=fp16", "--out", str(bundle / "q")]) == 1
    assert "overlaps the input" in capsys.readouterr().err
    assert not (bundle / "q").exists()


def test_overwrite_replaces_only_a_bundle(checkpoint, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    assert main(["export", str(checkpoint), "--out", str(mine), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert str(mine) in err and "not an emu-edge bundle" in err
    assert (mine / "todo.txt").read_text() == "keep me"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writers_leftovers_are_cleaned_on_the_next_write(tmp_path):
    out = tmp_path / "bundle"
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".bundle.partial-{dead}", tmp_path / f".bundle.old-{dead}"]
    kept = [tmp_path / f".bundle.partial-{alive}", tmp_path / f".other.partial-{dead}", tmp_path / "bundle.partial-1"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "decoder.onnx").write_bytes(b"half")
    with BundleWriter(out, log=lambda *a: None):
        pass
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept), "a live writer's or another bundle's folder was removed"
