"""No destructive surprises: writers never replace their inputs or a folder that is not
theirs, clean what a killed writer left, and training never silently starts over a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from emu_edge.cli import main
from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.training import checkpoint as ckpt
from emu_edge.training.checkpoint import CheckpointError
from emu_edge.training.config import get_preset
from emu_edge.training.train import train


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


# -- training ---------------------------------------------------------------------------


def _tiny(steps: int):
    cfg = get_preset("tiny")
    cfg.steps = {s: steps for s in cfg.steps}
    return cfg


def test_train_refuses_a_folder_holding_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"stage": 1, "step": 1, "loss": 1.0}\n')
    with pytest.raises(CheckpointError, match="already holds a run .*metrics.jsonl.*--resume.*--overwrite"):
        train(_tiny(1), run, ["1"], judge=False, progress=False)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--preset", "tiny", "--out", str(run), "--stages", "1", "--steps", "1", "--no-progress"])
    assert (run / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(SystemExit, match="pass one of them"):
        main(["train", "--preset", "tiny", "--out", str(run), "--resume", "--overwrite"])


def test_train_overwrite_starts_a_clean_run(tmp_path):
    run = tmp_path / "run"
    (run / "steps" / "4-001000").mkdir(parents=True)
    (run / "steps" / "latest.json").write_text(json.dumps({"step": "4-001000"}))
    (run / "metrics.jsonl").write_text('{"stage": 4, "step": 1000, "loss": 1.0}\n')
    (run / "notes.txt").write_text("not the run's")
    train(_tiny(1), run, ["1"], judge=False, progress=False, overwrite=True)
    assert sorted(p.name for p in (run / "steps").iterdir()) == ["1-000001", "latest.json"]
    assert [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "not the run's"
    assert ckpt.latest_step(run).name == "1-000001"


def test_pruning_orders_step_folders_by_number_and_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for name in ("0-999998", "0-999999", "0-1000000"):  # by name, "0-1000000" sorts first
        ckpt.save_step(tmp_path, name, model, optimizer, {"stage": "0", "step": int(name[2:])}, keep=2)
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["0-1000000", "0-999999", "latest.json"]
    # A step folder written after later ones (an old run's) is never the one pruned.
    ckpt.save_step(tmp_path, "0-000001", model, optimizer, {"stage": "0", "step": 1}, keep=2)
    assert ckpt.latest_step(tmp_path).name == "0-000001"
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["0-000001", "0-1000000", "latest.json"]
