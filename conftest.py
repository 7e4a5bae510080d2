"""Session fixtures shared by the test suite: one tiny model trained through the CLI."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`emu-edge train --preset tiny --steps 20`: the checkpoint every tiny test builds on."""
    from emu_edge.cli import main

    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    assert main(["train", "--preset", "tiny", "--steps", "20", "--out", str(out), "--no-progress"]) == 0
    return out
