"""Peak memory of one Emu3 image, each peer in a process of its own:

    python -m benchmarks.peak_rss '{"peer": "ours", "bundle": ..., ...}'

loads the peer, makes one image, and prints JSON: the process's RSS once the model is
loaded and its peak RSS (Linux VmHWM) after the image, in MB. A fresh process is the only
place where one peer's peak is not mixed with another's: the benchmark's own process holds
every peer at once, and a freed buffer it reuses would hide the next peer's growth.
`measure(spec)` runs it from the benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peer(spec: dict):
    from . import peers

    if spec["peer"] == "ours":
        pipe = peers.load_pipeline(Path(spec["bundle"]), spec["threads"], spec["max_length"])
        return peers.ours_image(pipe, spec["prompt"], spec["negative"], spec["height"], spec["width"],
                                spec["guidance"])
    model = peers.emu3_torch_model(Path(spec["folder"]), spec["threads"])
    return peers.emu3_torch_image(model, Path(spec["folder"]), spec["prompt_ids"], spec["negative_ids"],
                                  spec["rows"], spec["cols"], spec["guidance"])


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    peer = _peer(spec)
    loaded = _rss_mb("VmRSS")
    peer()
    print(json.dumps({"after_load": round(loaded, 1), "peak": round(_rss_mb("VmHWM"), 1)}))
    return 0


def measure(spec: dict) -> dict:
    """Run one peer's image in a fresh process; its figures, or {"error": ...}."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.peak_rss", json.dumps(spec)], cwd=REPO,
                         capture_output=True, text=True)
    if run.returncode:
        return {"error": (run.stderr or run.stdout)[-500:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
