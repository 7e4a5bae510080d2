"""Options, shared artifacts and the end-of-run report of the side-by-side suite.

    pytest benchmarks --benchmark-only                       full run (published numbers)
    pytest benchmarks --benchmark-only --smoke               CI: tiny sizes, 2 rounds (< 60 s)
    pytest benchmarks --benchmark-only --checkpoint models/emu-edge-small --rounds 9 --threads 2

Artifacts (checkpoints of the random presets, bundles, onnxruntime-genai models) are built
once into --bench-cache and reused; the results go to --bench-out as results.json and PNG
plots, and a summary with medians, spreads, ratios and targets is printed at the end.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from .harness import Results

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "emu-edge-small"


def pytest_addoption(parser):
    group = parser.getgroup("emu-edge benchmarks")
    group.addoption("--smoke", action="store_true", default=os.environ.get("EMU_EDGE_BENCH_SMOKE") == "1",
                    help="tiny presets and 2 rounds, to check the suite runs (also EMU_EDGE_BENCH_SMOKE=1)")
    group.addoption("--checkpoint", type=Path, default=None,
                    help=f"a trained checkpoint to compare on besides the presets (default: {SHIPPED} if present)")
    group.addoption("--rounds", type=int, default=None, help="interleaved rounds per comparison (default 7; smoke 2)")
    group.addoption("--threads", type=int, default=None, help="threads for every peer (default: all cores)")
    group.addoption("--bench-out", type=Path, default=None,
                    help="where results.json and the plots go (default benchmarks/results, smoke: "
                         "benchmarks/results/smoke)")
    group.addoption("--bench-cache", type=Path, default=None,
                    help="where built checkpoints, bundles and genai models are kept "
                         "(default $EMU_EDGE_CACHE/bench or ~/.cache/emu-edge/bench)")


class Settings:
    def __init__(self, config):
        self.smoke = config.getoption("--smoke")
        self.rounds = config.getoption("--rounds") or (2 if self.smoke else 7)
        self.threads = config.getoption("--threads") or os.cpu_count() or 1
        checkpoint = config.getoption("--checkpoint")
        if checkpoint is None and not self.smoke and (SHIPPED / "emu.json").is_file():
            checkpoint = SHIPPED
        self.checkpoint = checkpoint
        out = config.getoption("--bench-out")
        self.out = out or (REPO / "benchmarks" / "results" / ("smoke" if self.smoke else ""))
        cache = config.getoption("--bench-cache")
        root = Path(os.environ.get("EMU_EDGE_CACHE", Path.home() / ".cache" / "emu-edge"))
        self.cache = cache or root / "bench"
        # Sizes: (prompt tokens, new tokens), the decoder and U-Net presets, N for regression.
        self.prompt_tokens = 16
        self.new_tokens = 16 if self.smoke else 128
        self.decoder = "decoder-smoke" if self.smoke else "decoder-30m"
        self.unets = ("unet-smoke-16", "unet-smoke-32") if self.smoke else ("unet-10m-32", "unet-10m-64")
        self.unet_steps = 2 if self.smoke else 10
        self.regression_ns = (4, 16) if self.smoke else (16, 64, 256)
        self.contexts = (64, 128) if self.smoke else (128, 256, 512, 1024, 2048)
        self.batches = (1, 2) if self.smoke else (1, 2, 4, 8)
        # Emu3 image generation: the preset, the image's side in codes, and fewer rounds than
        # the rest (an image of 32 x 32 codes is over 1,000 decoder steps a peer, and
        # transformers with guidance takes tens of seconds a call).
        self.emu3 = "emu3-smoke" if self.smoke else "emu3-30m"
        self.emu3_codes = 4 if self.smoke else 32
        self.emu3_rounds = config.getoption("--rounds") or (2 if self.smoke else 3)

    def describe(self) -> dict:
        return {"smoke": self.smoke, "rounds": self.rounds, "emu3_rounds": self.emu3_rounds, "threads": self.threads,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens}


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: part of the CI smoke pass")
    config._emu_settings = Settings(config)
    config._emu_results = Results()
    config._emu_workspace = Workspace(config._emu_settings)
    config._emu_started = time.time()


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    return pytestconfig._emu_settings


@pytest.fixture(scope="session")
def results(pytestconfig) -> Results:
    return pytestconfig._emu_results


class Workspace:
    """Checkpoints and what is built from them, each made once (and cached across runs)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.made_by: dict[str, str] = {}   # "preset precision" -> how the bundle was quantized
        self._memo: dict = {}

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def checkpoint(self, name: str) -> Path:
        """A preset name, or "checkpoint" for --checkpoint."""
        if name == "checkpoint":
            if self.settings.checkpoint is None:
                why = "the smoke pass uses random presets only" if self.settings.smoke else \
                    "the shipped model is not in models/"
                pytest.skip(f"no trained checkpoint: pass --checkpoint DIR ({why})")
            return Path(self.settings.checkpoint)
        from .presets import checkpoint_for

        return self.memo(("ck", name), lambda: checkpoint_for(name, self.settings.cache))

    @staticmethod
    def is_emu3(name: str) -> bool:
        from .emu3_presets import EMU3_PRESETS

        return name in EMU3_PRESETS

    def work(self, name: str) -> Path:
        """Where the bundles and genai models built from this checkpoint live: keyed by the
        checkpoint's files and by the code and versions that build them, so a change to the
        exporter or the quantizer rebuilds instead of benchmarking stale graphs."""
        from . import peers

        ck = self.checkpoint(name)
        key = self.memo(("key", name), lambda: f"{peers.fingerprint(ck)}-{peers.code_key()}")
        folder = self.settings.cache / "artifacts" / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def bundle(self, name: str, precision: str = "fp32") -> Path:
        from . import peers

        def make():
            export = peers.export_hf_bundle if self.is_emu3(name) else peers.export_bundle
            fp32 = export(self.checkpoint(name), self.work(name))
            if precision == "fp32":
                return fp32
            out, how = peers.quantized_bundle(fp32, precision, self.work(name), threads=self.settings.threads,
                                              samples=8 if self.settings.smoke else 24)
            self.made_by[f"{name} {precision}"] = how
            return out

        return self.memo(("bundle", name, precision), make)

    def pipeline(self, name: str, precision: str = "fp32", max_length: int | None = None):
        from . import peers

        return self.memo(("pipe", name, precision, max_length),
                         lambda: peers.load_pipeline(self.bundle(name, precision), self.settings.threads, max_length))

    def torch_model(self, name: str):
        from . import peers

        load = peers.emu3_torch_model if self.is_emu3(name) else peers.torch_model
        return self.memo(("torch", name), lambda: load(self.checkpoint(name), self.settings.threads))

    def genai_source(self, name: str) -> Path:
        """A folder whose llm/ onnxruntime-genai's builder reads: the checkpoint's own, or
        for an Emu3 folder its text model written as a LlamaForCausalLM folder."""
        if not self.is_emu3(name):
            return self.checkpoint(name)
        from .emu3_presets import llama_folder

        return self.memo(("llama", name), lambda: llama_folder(self.checkpoint(name), self.work(name) / "llama"))

    def genai(self, name: str, precision: str) -> Path:
        """onnxruntime-genai's model of the checkpoint's llm/ (fp32 and int4 built together;
        for an Emu3 folder, of its text model: genai_source)."""
        from . import peers

        reason = peers.genai_available()
        if reason:
            pytest.skip(reason)

        def make():
            try:
                return peers.genai_build(self.genai_source(name), ("fp32", "int4"), self.work(name),
                                         self.settings.threads)
            except peers.PeerUnavailable as e:
                return e

        built = self.memo(("genai", name), make)
        if isinstance(built, Exception):
            pytest.skip(str(built))
        return built[precision]

    def bandwidth(self, nbytes: int) -> dict:
        """Read bandwidth over a buffer of `nbytes` (see peers.memory_bandwidth)."""
        from . import peers

        return self.memo(("bandwidth", nbytes), lambda: peers.memory_bandwidth(self.settings.threads, nbytes))


@pytest.fixture(scope="session")
def workspace(pytestconfig) -> Workspace:
    return pytestconfig._emu_workspace


# -- the end-of-run report --------------------------------------------------------------------


def _facts(config) -> dict:
    from emu_edge.runtime.bench import machine_info

    versions = {}
    for module in ("onnxruntime", "onnxruntime_genai", "torch", "transformers", "diffusers", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    s = config._emu_settings
    return {"settings": s.describe(), "machine": machine_info(), "versions": versions,
            "python": platform.python_version(), "seconds": round(time.time() - config._emu_started, 1),
            "quantized_by": dict(config._emu_workspace.made_by)}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results: Results = config._emu_results
    if not (results.comparisons or results.curves):
        return
    results.facts.update(_facts(config))
    s = config._emu_settings
    s.out.mkdir(parents=True, exist_ok=True)
    json_path = s.out / "results.json"
    json_path.write_text(json.dumps(results.as_dict(), indent=2, default=float) + "\n")
    from .plots import plot_all

    pngs = plot_all(results, s.out)
    tr = terminalreporter
    tr.section("emu-edge side by side")
    tr.write_line(f"threads {s.threads}, {s.rounds} interleaved rounds per comparison ({s.emu3_rounds} for Emu3 "
                  "images); medians, (min, max) and ratios")
    for line in results.format().splitlines():
        tr.write_line(line)
    tr.write_line(f"wrote {json_path}")
    for png in pngs:
        tr.write_line(f"wrote {png}")
