"""Fixtures of the test suite; the tiny models they build come from tests/tiny_models.py."""

from __future__ import annotations

import pytest

from tiny_models import make_emu3_bundle, make_llm_folder


@pytest.fixture(scope="session")
def llm_folders(tmp_path_factory):
    """preset -> a saved HF folder, made on first use and shared by the session."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = make_llm_folder(tmp_path_factory.mktemp(f"llm_{preset}"), preset)
        return made[preset]

    return get


@pytest.fixture(scope="session")
def emu3_bundle(tmp_path_factory):
    """export-hf of a tiny "f2" Emu3 folder; image_area 36: the default image is 6x6 pixels
    (3x3 codes of the f2 VQ)."""
    return make_emu3_bundle(tmp_path_factory.mktemp("emu3"), "f2", image_area=36)
