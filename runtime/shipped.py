"""Where the default bundle lives: the shipped checkpoint, exported once into a cache.

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

SHIPPED_NAME = "emu-edge-small"


def shipped_checkpoint() -> Path:
    # The checkpoint is in the repository (models/), beside the package folders.
    return Path(__file__).resolve().parents[1] / "models" / SHIPPED_NAME


def cache_root() -> Path:
    return Path(os.environ.get("EMU_EDGE_CACHE", Path.home() / ".cache" / "emu-edge"))


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "eval.json"):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def cached_bundle_path() -> Path:
    """Where the shipped checkpoint's bundle is (or will be) cached."""
    ck = shipped_checkpoint()
    if not (ck / "emu.json").is_file():
        raise FileNotFoundError(
            f"no default bundle: the shipped checkpoint {ck} is not here (an installed wheel does not carry it). "
            "Pass --bundle DIR, or set EMU_EDGE_BUNDLE.")
    # Keyed by the manifest schema too: a runtime that reads a newer schema exports afresh
    # instead of finding (and refusing) the bundle an older one cached.
    return cache_root() / "bundles" / f"{SHIPPED_NAME}-v{SCHEMA_VERSION}-{_fingerprint(ck)}"


def default_bundle(log=print) -> Path:
    """The default bundle, exported from the shipped checkpoint on first use."""
    if os.environ.get("EMU_EDGE_BUNDLE"):
        return Path(os.environ["EMU_EDGE_BUNDLE"])
    ck = shipped_checkpoint()
    bundle = cached_bundle_path()
    if (bundle / "manifest.json").is_file():
        return bundle
    log(f"exporting the shipped model {ck} to {bundle} (once; later runs reuse it)")
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("exporting the shipped model needs the [train] extra (pip install 'emu-edge[train]'); "
                           "or export on a host and pass --bundle")
    result = subprocess.run([sys.executable, "-m", "emu_edge.cli", "export", str(ck), "--out", str(bundle)])
    if result.returncode:
        raise RuntimeError(f"exporting {ck} failed (exit {result.returncode}); see the messages above")
    return bundle
