"""Where the default bundles live: the shipped models, each exported once into a cache.

Two models ship in models/: the Emu2-style `emu-edge-small` (the default everywhere) and
the Emu3-style `emu3-edge-small` (an Emu3ForConditionalGeneration folder, exported by
export-hf; `emu-edge demo` shows both).

    EMU_EDGE_BUNDLE   use this bundle folder as the default
    EMU_EDGE_CACHE    cache root (default ~/.cache/emu-edge); bundles go under bundles/

The cache key is the manifest schema version and a hash of the checkpoint's files, so
retraining the shipped model, or a runtime that reads a newer schema, re-exports it. Exporting needs the `[train]` extra (torch); it runs as a separate process
so the runtime itself never imports torch. On a device, copy a bundle and pass --bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from emu_edge.runtime.manifest import SCHEMA_VERSION

# family -> (the shipped folder's name, the file that marks it, the verb that exports it)
SHIPPED = {"emu2": ("emu-edge-small", "emu.json", "export"),
           "emu3": ("emu3-edge-small", "config.json", "export-hf")}


def shipped_checkpoint(family: str = "emu2") -> Path:
    # The checkpoints are in the repository (models/), beside the package folders.
    return Path(__file__).resolve().parents[1] / "models" / SHIPPED[family][0]


def cache_root() -> Path:
    return Path(os.environ.get("EMU_EDGE_CACHE", Path.home() / ".cache" / "emu-edge"))


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "eval.json"):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def cached_bundle_path(family: str = "emu2") -> Path:
    """Where the shipped checkpoint's bundle is (or will be) cached."""
    name, mark, _ = SHIPPED[family]
    ck = shipped_checkpoint(family)
    if not (ck / mark).is_file():
        raise FileNotFoundError(
            f"no default bundle: the shipped checkpoint {ck} is not here (an installed wheel does not carry it). "
            "Pass --bundle DIR, or set EMU_EDGE_BUNDLE.")
    # Keyed by the manifest schema too: a runtime that reads a newer schema exports afresh
    # instead of finding (and refusing) the bundle an older one cached.
    return cache_root() / "bundles" / f"{name}-v{SCHEMA_VERSION}-{_fingerprint(ck)}"


def default_bundle(log=print, family: str = "emu2") -> Path:
    """The default bundle (family: which shipped model), exported on first use."""
    if os.environ.get("EMU_EDGE_BUNDLE"):
        return Path(os.environ["EMU_EDGE_BUNDLE"])
    ck = shipped_checkpoint(family)
    bundle = cached_bundle_path(family)
    if (bundle / "manifest.json").is_file():
        return bundle
    log(f"exporting the shipped model {ck} to {bundle} (once; later runs reuse it)")
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("exporting the shipped model needs the [train] extra (pip install 'emu-edge[train]'); "
                           "or export on a host and pass --bundle")
    verb = SHIPPED[family][2]
    result = subprocess.run([sys.executable, "-m", "emu_edge.cli", verb, str(ck), "--out", str(bundle)])
    if result.returncode:
        raise RuntimeError(f"exporting {ck} failed (exit {result.returncode}); see the messages above")
    return bundle
