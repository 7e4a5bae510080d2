"""`emu-edge calibrate`: record the real inputs of every graph of an FP32 bundle.

The bundle runs through the runtime's own Pipeline on a calibration folder, with each
graph's backend wrapped in a recorder, so what is recorded is exactly what the graphs see
in use: the vision encoder's pixels, the decoder at prefill, at each decode step and
while regressing image embeddings, and the U-Net at every timestep with both guidance
branches (they share one batched call). An emu3 bundle's requests record its VQ encoder
on the input images, the decoder on prompts whose images are visual tokens and through
the image-token loop (cond and uncond rows), and its VQ decoder on the generated codes. A
request the family cannot serve at all (an emu3 bundle asked to edit an image) is
skipped, and said so.

    CALIB/
      calibration.json      what was recorded: per graph, the samples (the request they
                            came from, phase, held out or not) and the source graph sha256
      <graph>.safetensors   the inputs, "<sample>/<input name>" -> array

The decoder's KV buffers are stored only up to the longest row's filled length and zero
padded back to the buffer length on load (the graph masks everything past a row's
length, and the runtime zero-fills new buffers, so the padding is what the graph saw).
The last requests (--heldout, 20% by default) are held out: quantization calibrates on
the others and the accuracy report measures on these.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emu_edge.calibration.data import CalibrationDataError, Request, read_requests, token_prompts
from emu_edge.runtime.bundle import Bundle
from emu_edge.runtime.families import UnsupportedRequest
from emu_edge.runtime.pipeline import Pipeline

INDEX_FILE = "calibration.json"
FORMAT = "emu-edge-calibration"
VERSION = 1
KV_PREFIX = "past_key_values."
# Graphs the model runs on a request; the judge only scores.
RECORDED_GRAPHS = ("decoder", "vision_encoder", "unet", "vq_encoder", "vq_decoder")


# -- recording ------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.samples: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
        self.context: dict = {}

    def add(self, graph: str, feeds: dict[str, np.ndarray], **meta) -> None:
        self.samples[graph].append(({**self.context, **meta}, feeds))


class _RecordingBinding:
    """An IOBinding that remembers what was bound as input, so the bound call can be
    recorded; everything else goes to the real binding."""

    def __init__(self, inner):
        self.inner = inner
        self.inputs: dict[str, object] = {}

    def bind_cpu_input(self, name, array):
        self.inputs[name] = array
        self.inner.bind_cpu_input(name, array)

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value
        self.inner.bind_ortvalue_input(name, value)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _RecordingBackend:
    """Wraps one graph's backend: every run, plain or bound, is recorded before it runs."""

    def __init__(self, backend, graph: str, recorder: _Recorder):
        self._backend = backend
        self._graph = graph
        self._recorder = recorder

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def run(self, feeds, outputs=None):
        self._recorder.add(self._graph, {k: np.array(v, copy=True) for k, v in feeds.items()}, **self._meta(feeds))
        return self._backend.run(feeds, outputs)

    def bind(self):
        return _RecordingBinding(self._backend.bind())

    def run_bound(self, binding):
        feeds = {name: np.array(v.numpy() if hasattr(v, "numpy") else v, copy=True)
                 for name, v in binding.inputs.items()}
        feeds, meta = _trim_kv(feeds)
        self._recorder.add(self._graph, feeds, **meta, **self._meta(feeds))
        self._backend.run_bound(binding.inner)

    def _meta(self, feeds) -> dict:
        if self._graph == "unet" and "timestep" in feeds:
            return {"timestep": float(np.asarray(feeds["timestep"]).reshape(-1)[0])}
        return {}


def _trim_kv(feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Cut the decoder's KV buffers to the rows the call reads as its past; the rest is
    either masked or about to be written. Returns the feeds and {phase, kv_length}."""
    if "input_ids" not in feeds or "seqlens_k" not in feeds:
        return feeds, {}
    steps = feeds["input_ids"].shape[1]
    past = np.maximum(feeds["seqlens_k"].astype(np.int64) + 1 - steps, 0)
    keep = int(past.max())
    out, kv_length = {}, None
    for name, value in feeds.items():
        if name.startswith(KV_PREFIX):
            kv_length = value.shape[2]
            value = np.ascontiguousarray(value[:, :, :keep])
        out[name] = value
    return out, {"phase": "prefill" if keep == 0 else "decode", "kv_length": kv_length}


# -- running a calibration set ---------------------------------------------------------------


@dataclass
class CalibrateSettings:
    max_new_tokens: int = 16      # decode steps recorded per text request
    steps: int | None = None      # denoising steps per image request (default: the bundle's)
    image_size: int | None = None  # side of generated images in pixels (default: the bundle's)
    max_samples: int = 256        # per graph, spread evenly over phases and requests
    heldout: float = 0.2          # fraction of requests kept for the accuracy report
    threads: int | None = None


def calibrate(bundle_path: str | Path, data: str | Path, out: str | Path, settings: CalibrateSettings | None = None,
              log=print) -> Path:
    """Run the FP32 bundle on the calibration folder `data`; write the recorded inputs to `out`."""
    settings = settings or CalibrateSettings()
    _check_settings(settings)
    bundle = Bundle.open(bundle_path)
    graphs = bundle.manifest.graphs
    not_fp32 = {n: g.precision for n, g in graphs.items() if n in RECORDED_GRAPHS and g.precision != "fp32"}
    if not_fp32:
        raise CalibrationDataError(
            f"calibration records the FP32 model, but {bundle.path} has "
            + ", ".join(f"{n} in {p}" for n, p in not_fp32.items()) + "; calibrate the fp32 bundle it came from")
    pipe = Pipeline.load(bundle, threads=settings.threads)
    multimodal = pipe.is_multimodal
    model = bundle.manifest.model
    # Only emu2 takes images of one size; emu3 resizes any image as its processor does.
    requests = read_requests(data, model.emu2.image_size if model.emu2 is not None else None, multimodal)
    recorder = _Recorder()
    for name in RECORDED_GRAPHS:
        if bundle.has_graph(name):
            pipe.graph(name)
    pipe.backends = {n: _RecordingBackend(b, n, recorder) for n, b in pipe.backends.items()}
    heldout_from = len(requests) - _heldout_count(len(requests), settings.heldout)
    prompt_kind = None
    if not multimodal:
        ids, prompt_kind = token_prompts(pipe, [r.text for r in requests])
        for request, row in zip(requests, ids):
            request.ids = row
        log(f"  text prompts: {prompt_kind}")
    start = time.perf_counter()
    skipped: dict[str, list[str]] = defaultdict(list)    # why -> tasks
    for k, request in enumerate(requests):
        recorder.context = {"request": k, "record": request.record, "task": request.task,
                            "heldout": k >= heldout_from}
        try:
            _run_request(pipe, request, settings)
        except UnsupportedRequest as e:
            skipped[str(e)].append(request.task)
        if (k + 1) % 10 == 0 or k + 1 == len(requests):
            log(f"  {k + 1}/{len(requests)} requests, {time.perf_counter() - start:.0f} s")
    for why, tasks in skipped.items():
        log(f"  skipped {len(tasks)} request(s) ({', '.join(sorted(set(tasks)))}): {why}")
    return _save(out, bundle, data, requests, recorder, settings, heldout_from, prompt_kind, log)


def _check_settings(s: CalibrateSettings) -> None:
    if s.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.steps is not None and s.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {s.steps}")
    if s.image_size is not None and s.image_size < 1:
        raise ValueError(f"--image-size must be >= 1 pixel, got {s.image_size}")
    if s.max_samples < 2:
        raise ValueError(f"--max-samples must be >= 2, got {s.max_samples}")
    if not 0 <= s.heldout < 1:
        raise ValueError(f"--heldout is a fraction in [0, 1), got {s.heldout}")


def _heldout_count(n: int, fraction: float) -> int:
    if n < 2 or fraction == 0:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _run_request(pipe: Pipeline, request: Request, settings: CalibrateSettings) -> None:
    if request.ids is not None:
        pipe.generate_ids(request.ids, settings.max_new_tokens, ignore_eos=True)
    elif request.generate == "image":
        # The one image call every family has: images (subject-driven) before the prompt.
        *images, prompt = request.items
        pipe.image_request(prompt, images, width=settings.image_size, height=settings.image_size,
                           steps=settings.steps, seed=request.record)
    else:
        # ignore_eos: a short answer would otherwise leave few decode steps to record.
        # truncate: a few-shot prompt longer than the context keeps its latest items.
        pipe.generate_text(request.items, max_new_tokens=settings.max_new_tokens, ignore_eos=True, truncate=True)


def _spread(samples: list, cap: int) -> list:
    """At most `cap` samples, evenly spaced, from every (phase, held out) group in
    proportion to its size, so decode steps do not crowd out prefills."""
    if len(samples) <= cap:
        return samples
    groups: dict[tuple, list] = defaultdict(list)
    for s in samples:
        groups[(s[0].get("phase"), s[0]["heldout"])].append(s)
    kept = []
    for group in groups.values():
        n = max(1, math.floor(cap * len(group) / len(samples)))
        picks = np.unique(np.linspace(0, len(group) - 1, n).round().astype(int))
        kept += [group[i] for i in picks]
    return sorted(kept, key=lambda s: s[0]["request"])


def _save(out, bundle: Bundle, data, requests, recorder: _Recorder, settings: CalibrateSettings,
          heldout_from: int, prompt_kind: str | None, log) -> Path:
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "format": FORMAT, "version": VERSION, "bundle": str(Path(bundle.path).resolve()),
        "data": str(Path(data).resolve()), "requests": len(requests), "heldout_requests": len(requests) - heldout_from,
        "text_prompts": prompt_kind,
        "settings": {"max_new_tokens": settings.max_new_tokens, "steps": settings.steps,
                     "image_size": settings.image_size, "max_samples": settings.max_samples,
                     "heldout": settings.heldout},
        "graphs": {},
    }
    for graph in sorted(recorder.samples):
        samples = _spread(recorder.samples[graph], settings.max_samples)
        # np.ascontiguousarray would turn a 0-d array (total_sequence_length) into shape [1]
        tensors = {f"{i:06d}/{name}": np.array(v, order="C") for i, (_, feeds) in enumerate(samples)
                   for name, v in feeds.items()}
        file = f"{graph}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": FORMAT})
        spec = bundle.manifest.graphs[graph]
        index["graphs"][graph] = {
            "file": file, "sha256": spec.sha256, "inputs": sorted(samples[0][1]),
            "samples": [meta for meta, _ in samples],
        }
        held = sum(m["heldout"] for m, _ in samples)
        log(f"  {graph}: {len(samples)} samples ({held} held out) of {len(recorder.samples[graph])} calls")
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return out


# -- reading a calibration folder back --------------------------------------------------------


class Calibration:
    """A CALIB folder written by `calibrate`."""

    def __init__(self, path: Path, index: dict):
        self.path = path
        self.index = index
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise CalibrationDataError(f"{path} is not a calibration folder (no {INDEX_FILE}); make one with "
                                       f"emu-edge calibrate BUNDLE --data DIR --out {path}")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{index_file} is not valid JSON ({e}); re-run emu-edge calibrate") from e
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise CalibrationDataError(f"{index_file} is not an {FORMAT} v{VERSION} index; re-run emu-edge calibrate")
        return cls(path, index)

    @property
    def graphs(self) -> list[str]:
        return list(self.index["graphs"])

    def _graph(self, graph: str) -> dict:
        if graph not in self.index["graphs"]:
            raise CalibrationDataError(f"{self.path} holds no samples of the {graph!r} graph "
                                       f"(it has {', '.join(self.graphs) or 'none'})")
        return self.index["graphs"][graph]

    def meta(self, graph: str) -> list[dict]:
        return self._graph(graph)["samples"]

    def samples(self, graph: str, heldout: bool | None = None) -> list[dict[str, np.ndarray]]:
        """The recorded feeds of `graph` (held-out ones only, the others only, or all),
        KV buffers padded back to their full length."""
        spec = self._graph(graph)
        if graph not in self._cache:
            from safetensors.numpy import load_file

            file = self.path / spec["file"]
            if not file.is_file():
                raise CalibrationDataError(f"{file} is missing from the calibration folder; re-run emu-edge calibrate")
            self._cache[graph] = load_file(str(file))
        tensors = self._cache[graph]
        out = []
        for i, meta in enumerate(spec["samples"]):
            if heldout is not None and meta["heldout"] != heldout:
                continue
            feeds = {name: tensors[f"{i:06d}/{name}"] for name in spec["inputs"]}
            out.append(_pad_kv(feeds, meta.get("kv_length")))
        return out

    def check(self, manifest, graphs: list[str]) -> None:
        """Refuse samples that cannot be this bundle's graph inputs: a missing graph, other
        input names, dtypes or fixed dimensions, or samples recorded on a different graph."""
        for graph in graphs:
            spec = manifest.graphs[graph]
            if graph not in self.index["graphs"]:
                raise CalibrationDataError(
                    f"{self.path} holds no samples of the {graph!r} graph (it has {', '.join(self.graphs) or 'none'}); "
                    f"the calibration folder needs requests that run it"
                    + (" (text_to_image records)" if graph in ("unet", "vq_decoder") else ""))
            recorded = self.index["graphs"][graph]
            if recorded["sha256"] != spec.sha256:
                raise CalibrationDataError(
                    f"{self.path} was recorded on a different {graph} graph (sha256 {recorded['sha256'][:12]}..., "
                    f"this bundle's is {spec.sha256[:12]}...): calibrate this bundle "
                    f"(emu-edge calibrate BUNDLE --data DIR --out CALIB)")
            names = {io.name for io in spec.inputs}
            if set(recorded["inputs"]) != names:
                raise CalibrationDataError(f"{self.path}: {graph} samples have inputs {sorted(recorded['inputs'])} but "
                                           f"the graph takes {sorted(names)}")
            samples = self.samples(graph)
            if not samples:
                raise CalibrationDataError(f"{self.path} has no {graph} samples; re-run emu-edge calibrate")
            for feeds in samples[:1] + samples[-1:]:
                for io in spec.inputs:
                    _check_input(self.path, graph, io, feeds[io.name])


def _check_input(path, graph: str, io, value: np.ndarray) -> None:
    if value.dtype != np.dtype(io.dtype):
        raise CalibrationDataError(f"{path}: {graph}.{io.name} was recorded as {value.dtype}, the graph takes "
                                   f"{io.dtype}; re-run emu-edge calibrate on this bundle")
    fixed = [(axis, dim) for axis, dim in enumerate(io.shape) if isinstance(dim, int)]
    if value.ndim != len(io.shape) or any(value.shape[a] != d for a, d in fixed):
        raise CalibrationDataError(f"{path}: {graph}.{io.name} was recorded with shape {list(value.shape)}, the graph "
                                   f"takes {io.shape}; re-run emu-edge calibrate on this bundle")


def _pad_kv(feeds: dict[str, np.ndarray], kv_length: int | None) -> dict[str, np.ndarray]:
    if kv_length is None:
        return feeds
    out = {}
    for name, value in feeds.items():
        if name.startswith(KV_PREFIX) and value.shape[2] < kv_length:
            full = np.zeros(value.shape[:2] + (kv_length,) + value.shape[3:], value.dtype)
            full[:, :, : value.shape[2]] = value
            value = full
        out[name] = value
    return out
