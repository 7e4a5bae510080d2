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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """`emu-edge export` of the tiny checkpoint (GroupQueryAttention decoder)."""
    from emu_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert main(["export", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_bundle_standard(tiny_checkpoint, tmp_path_factory):
    """The same checkpoint with the standard-ops decoder (the TensorRT variant)."""
    from emu_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny_standard"
    assert main(["export", str(tiny_checkpoint), "--out", str(out), "--attention", "standard"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint as PyTorch modules: (model, tokenizer, config), for parity."""
    from emu_edge.training.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def shipped_checkpoint_dir():
    """models/emu-edge-small, the checkpoint the README's demo runs."""
    from emu_edge.runtime.shipped import shipped_checkpoint

    return shipped_checkpoint()


@pytest.fixture(scope="session")
def shipped_bundle(shipped_checkpoint_dir, tmp_path_factory):
    """`emu-edge export` of the shipped checkpoint (exported fresh: the golden tests must
    see what today's exporter writes, not a cached bundle)."""
    from emu_edge.cli import main

    out = tmp_path_factory.mktemp("bundles") / "emu-edge-small"
    assert main(["export", str(shipped_checkpoint_dir), "--out", str(out)]) == 0
    return out
