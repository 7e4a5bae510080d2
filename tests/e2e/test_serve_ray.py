"""`emu-edge serve --ray` with 2 replicas on a local Ray, inside a loopback-only network
namespace (`unshare -n`: Ray binds the machine's address even when given 127.0.0.1, and
there that address is loopback). Started once for the module by ray_check.py, which stops
it and reports; bounded (the server stops by itself, every wait has a limit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
pytest.importorskip("openai")

from emu_edge.runtime.pipeline import Pipeline  # noqa: E402

HELPER = Path(__file__).with_name("ray_check.py")


def _loopback_namespace() -> str | None:
    """Why a loopback-only namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "unshare -n needs root (CI runs as root)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10)
    return None if probe.returncode == 0 else f"unshare -n failed: {probe.stderr.decode().strip()}"


@pytest.fixture(scope="module")
def ray_run(shipped_bundle, tmp_path_factory):
    reason = _loopback_namespace()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ray") / "result.json"
    command = f"ip link set lo up && exec {sys.executable} {HELPER} --bundle {shipped_bundle} --out {out}"
    subprocess.run(["unshare", "-n", "sh", "-c", command], timeout=120, check=True)
    result = json.loads(out.read_text())
    result["log"] = Path(f"{out}.log").read_text()[-3000:]
    return result


def test_two_replicas_answer_as_the_python_api_and_stop_cleanly(ray_run, shipped_bundle):
    report = {k: v for k, v in ray_run.items() if k != "log"}
    assert ray_run["started_s"] is not None, ray_run["log"]
    pipe = Pipeline.load(shipped_bundle, threads=1)
    want = {p: pipe.generate_text(p, max_new_tokens=8) for p in {a["prompt"] for a in ray_run["answers"]}}
    assert len(ray_run["answers"]) == 12, report
    assert all(a["text"] == want[a["prompt"]] for a in ray_run["answers"]), report
    # Ray's proxy spread the concurrent requests over both replicas
    replicas = {a["replica"] for a in ray_run["answers"]}
    assert len(replicas) == 2 and None not in replicas, report
    assert ray_run["stream"] == want["a red circle"], report
    assert ray_run["bad_request_status"] == 400, report
    assert ray_run["exit_code"] == 0 and ray_run["left"] == [], (report, ray_run["log"])
