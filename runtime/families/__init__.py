"""One module per model family; the manifest's `model.family` picks it.

A family turns its prompts (text, images, video) into token rows for the shared text core
and adds its own verbs (emu2: encode visuals, regress, denoise). A new family is a new
module here plus one entry below, touching no other family's code.
"""

from __future__ import annotations

import importlib

# family -> (module, class); imported only when a bundle of that family is loaded.
FAMILIES: dict[str, tuple[str, str]] = {
    "llm": ("emu_edge.runtime.families.llm", "LLM"),
    "emu2": ("emu_edge.runtime.families.emu2", "Emu2"),
    "emu3": ("emu_edge.runtime.families.emu3", "Emu3"),
}


class UnsupportedRequest(ValueError):
    """A request this family cannot serve at all (an emu3 bundle asked to edit an image),
    whatever its settings: a caller running many requests may skip it and go on."""


def family_class(name: str):
    if name not in FAMILIES:
        raise ValueError(f"this runtime has no family {name!r} (it runs {', '.join(FAMILIES)}); upgrade emu-edge")
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def split_by(items: list, sizes: list[int]) -> list[list]:
    """A batch's outputs back into its requests' runs of `sizes` rows each."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out
