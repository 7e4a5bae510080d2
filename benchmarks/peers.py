"""The peers, each loading the same checkpoint, and the artifacts they need.

    our runtime        `emu-edge export` of the checkpoint (fp32), then int8 / int4 bundles
    PyTorch eager      transformers `generate`, diffusers U-Net loop (training/generate.py)
    Emu2 reference     regression by re-running the whole decoder over the whole sequence
                       for every visual embedding, no KV cache (how Emu2's released code does it)
    onnxruntime-genai  its model builder run on the checkpoint's llm/ folder (fp32, int4)
    Emu3 images        transformers `generate` with its row constraint and CFG, then its VQ
                       decode; ours through Pipeline.image_ids and decode_image_ids (ImagePeer)

Every peer is a zero-argument callable doing one unit of work (a generation, a
regression, a denoising loop), so the harness can interleave them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PROMPT = "a red circle"
GENAI_BLOCK_SIZE = 32
GENAI_ACCURACY_LEVEL = 4


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why (the test skips with it)."""


def fingerprint(folder: Path) -> str:
    """A hash of every file in a checkpoint folder (training state excluded)."""
    import hashlib

    digest = hashlib.sha256()
    files = [p for p in Path(folder).rglob("*") if p.is_file() and p.relative_to(folder).parts[0] != "steps"]
    for path in sorted(files):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def code_key() -> str:
    """A hash of the code that builds the artifacts (exporter, quantizer, this file) and of
    the onnxruntime versions, for the artifact cache."""
    import hashlib
    import importlib.metadata

    import emu_edge.calibration
    import emu_edge.export

    digest = hashlib.sha256()
    folders = [Path(emu_edge.export.__file__).parent, Path(emu_edge.calibration.__file__).parent]
    for f in sorted(p for folder in folders for p in folder.glob("*.py")) + [Path(__file__)]:
        digest.update(f.name.encode() + f.read_bytes())
    for dist in ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "diffusers"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()[:10]


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _mark_done(folder: Path) -> None:
    (folder / ".complete").write_text("")


# -- our bundles ----------------------------------------------------------------------------


def export_bundle(checkpoint: Path, work: Path) -> Path:
    """`emu-edge export CHECKPOINT` (fp32), once per checkpoint."""
    out = work / "bundle-fp32"
    if not (out / "manifest.json").is_file():
        from emu_edge.export.cli import export_checkpoint

        export_checkpoint(checkpoint, out, overwrite=True)
    return out


def _emu_edge(*args: str) -> None:
    """`emu-edge ARGS` through the CLI's own entry, in this process: a subprocess would spend
    seconds importing again what this one has (torch, onnxruntime), which in the smoke pass
    cost more than the work. Its output is kept for the error."""
    import contextlib
    import io

    from emu_edge.cli import main

    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main(list(args))
    except (Exception, SystemExit) as e:   # as a subprocess's crash or usage error would be: a failure
        code = f"{type(e).__name__}: {e}"
    if code:
        raise RuntimeError(f"emu-edge {' '.join(args)} failed ({code}):\n{output.getvalue()[-3000:]}")


def export_hf_bundle(folder: Path, work: Path) -> Path:
    """`emu-edge export-hf FOLDER` (fp32), once per folder."""
    out = work / "bundle-fp32"
    if not (out / "manifest.json").is_file():
        _emu_edge("export-hf", str(folder), "--out", str(out), "--overwrite")
    return out


def quantize_with_cli(bundle: Path, precision: str, out: Path, work: Path, threads: int, samples: int) -> str:
    """`emu-edge quantize`: int4 is the decoder alone (weight-only, no calibration); int8 is
    every graph that has an INT8 form, the static ones calibrated through `emu-edge
    calibrate` on `emu-edge data` images at the model's size."""
    from emu_edge.runtime.manifest import Manifest

    common = ["--out", str(out), "--overwrite", "--threads", str(threads)]
    if precision == "int4":
        _emu_edge("quantize", str(bundle), "--graph", "decoder=int4", *common)
        return "emu-edge quantize --graph decoder=int4"
    if Manifest.load(bundle).model.family == "emu3":
        # An emu3 bundle's only INT8 graph is the decoder, weight-only: nothing to calibrate.
        _emu_edge("quantize", str(bundle), "--precision", "int8", *common)
        return "emu-edge quantize --precision int8"
    calibration = work / "calibration"
    if not _done(calibration):
        size = Manifest.load(bundle).model.emu2.image_size
        data = work / "calibration-data"
        shutil.rmtree(data, ignore_errors=True)
        _emu_edge("data", "--split", "val", "--n", str(samples), "--size", str(size), "--tasks",
                  "captioning,text_to_image", "--out", str(data))
        shutil.rmtree(calibration, ignore_errors=True)
        _emu_edge("calibrate", str(bundle), "--data", str(data), "--out", str(calibration), "--steps", "4",
                  "--max-new-tokens", "8", "--threads", str(threads))
        _mark_done(calibration)
    _emu_edge("quantize", str(bundle), "--precision", "int8", "--calibration", str(calibration), *common)
    return (f"emu-edge quantize --precision int8 (calibrated: emu-edge data --split val --n {samples} --tasks "
            "captioning,text_to_image, emu-edge calibrate --steps 4)")


def quantized_bundle(bundle: Path, precision: str, work: Path, threads: int, samples: int = 24) -> tuple[Path, str]:
    """An int8 or int4 bundle made from the fp32 one; returns (bundle, how it was made).
    `emu-edge quantize` makes it where this version has the verb; otherwise (or if it fails,
    which the returned text says) onnxruntime.quantization is called directly."""
    from emu_edge.cli import VERBS

    out = work / f"bundle-{precision}"
    made_by = work / f"bundle-{precision}.made_by"
    if (out / "manifest.json").is_file() and made_by.is_file():
        return out, made_by.read_text()
    how = None
    if "quantize" in VERBS:
        try:
            how = quantize_with_cli(bundle, precision, out, work, threads, samples)
        except RuntimeError as e:
            print(f"warning: {e}\nfalling back to onnxruntime.quantization directly", file=sys.stderr)
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            how = f"emu-edge quantize failed ({last}); "
    if how is None or how.endswith("; "):
        how = (how or "") + fallback_quantize(bundle, precision, out)
    made_by.write_text(how)
    return out, how


def fallback_quantize(bundle: Path, precision: str, out: Path) -> str:
    """Quantize with onnxruntime.quantization directly (until `emu-edge quantize` exists):

    int4  decoder MatMuls -> MatMulNBits, 4 bits, block 32, symmetric, accuracy level 4
          (int8 compute), as onnxruntime-genai's builder does for its int4 CPU model
    int8  decoder MatMuls -> MatMulNBits, 8 bits, block 32, accuracy level 4; U-Net Conv
          weights static QDQ (s8 per channel, u8 activations, calibrated on random inputs)
    """
    import onnx

    from emu_edge.export.bundle_writer import BundleWriter
    from emu_edge.runtime.bundle import Bundle

    src = Bundle.open(bundle, verify=False)
    graphs, how = {}, []
    decoder = onnx.load(str(src.graph_path("decoder")))
    bits = {"int4": 4, "int8": 8}[precision]
    graphs["decoder"] = _matmul_nbits(decoder, bits)
    how.append(f"decoder MatMulNBits {bits}-bit block {GENAI_BLOCK_SIZE} accuracy level {GENAI_ACCURACY_LEVEL}")
    if precision == "int8" and src.has_graph("unet"):
        graphs["unet"] = _unet_int8(src.graph_path("unet"), src.manifest.graphs["unet"])
        how.append("U-Net Conv static QDQ (s8 per-channel weights, u8 activations, random calibration)")
    with BundleWriter(out, overwrite=True, log=lambda *a: None) as writer:
        for name, spec in src.manifest.graphs.items():
            model = graphs.get(name) or onnx.load(str(src.graph_path(name)))
            writer.add_graph(name, model, precision=precision if name in graphs else spec.precision,
                             profiles=spec.profiles, extra=spec.extra, role=spec.role, names=spec.names,
                             precisions=spec.precisions)
        writer.write_tokenizer(src.path / src.manifest.tokenizer)
        writer.finish(src.manifest.model)
    return "benchmarks fallback: " + "; ".join(how)


def _quiet_quantizer_logs() -> None:
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _matmul_nbits(model, bits: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_quantizer_logs()
    ir = model.ir_version
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=GENAI_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=GENAI_ACCURACY_LEVEL)
    quantizer.process()
    q = quantizer.model.model
    q.ir_version = ir  # the bundle's IR target; MatMulNBits needs nothing newer
    return q


class _RandomUNetInputs:
    """Calibration batches for the U-Net: noisy samples at timesteps across the schedule,
    conditions drawn at random, half of them the unconditional zeros (as CFG feeds them)."""

    def __init__(self, spec, count: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        shapes = {io.name: io.shape for io in spec.inputs}
        _, c, h, w = shapes["sample"]
        _, n, d = shapes["encoder_hidden_states"]
        self.batches = []
        for i in range(count):
            cond = rng.standard_normal((2, n, d)).astype(np.float32)
            cond[1] = 0.0
            self.batches.append({
                "sample": rng.standard_normal((2, c, h, w)).astype(np.float32),
                "timestep": np.full(2, rng.uniform(0, 999), np.float32),
                "encoder_hidden_states": cond,
            })
        self._iter = iter(self.batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self.batches)


def _unet_int8(path: Path, spec):
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _quiet_quantizer_logs()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "unet_int8.onnx"
        quantize_static(str(path), str(out), _RandomUNetInputs(spec), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        model = onnx.load(str(out))
    model.ir_version = min(model.ir_version, 9)
    return model


# -- our runtime ----------------------------------------------------------------------------


def load_pipeline(bundle: Path, threads: int, max_length: int | None = None):
    from emu_edge.runtime.pipeline import Pipeline

    return Pipeline.load(bundle, threads=threads, max_length=max_length, verify=False)


def with_n_query(pipe, n: int):
    """The same pipeline (same sessions) regressing n embeddings per image instead of the
    bundle's N: the cost of the regression loop at other N, through the runtime's own code."""
    from emu_edge.runtime.pipeline import Pipeline

    model = pipe.manifest.model
    emu2 = dataclasses.replace(model.emu2, n_query=n)
    manifest = dataclasses.replace(pipe.manifest, model=dataclasses.replace(model, emu2=emu2))
    bundle = dataclasses.replace(pipe.bundle, manifest=manifest)
    return Pipeline(bundle, pipe.backends, pipe.max_length, pipe.device, pipe.backend_kind, pipe.threads)


def ours_generate(pipe, prompt: list[int], n: int):
    return lambda: pipe.generate_ids(prompt, n, ignore_eos=True)


def ours_regress(pipe):
    encoded = pipe.encode_items([PROMPT], "image")
    return lambda: pipe.regress([encoded])


def ours_denoise(pipe, cond: np.ndarray, steps: int):
    return lambda: pipe.denoise(cond, steps=steps, guidance=3.0, scheduler="ddim", seed=0)


def teacher_forced_agreement(pipe, prompt: list[int], reference: list[int]) -> float:
    """Fraction of positions where `pipe`'s greedy choice equals the reference token, each
    position seeing the reference's own history (so one early difference does not turn
    every later position into a mismatch)."""
    session = pipe.session(1)
    out = session.prefill([prompt])
    hits = 0
    for i, token in enumerate(reference):
        hits += int(np.argmax(out.logits[0]) == token)
        if i < len(reference) - 1:
            out = session.step([token])
    return hits / len(reference)


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the sequence generated before the first differing token."""
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return same / max(n, 1)


# -- PyTorch --------------------------------------------------------------------------------


def torch_model(checkpoint: Path, threads: int):
    import torch

    from emu_edge.training.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, tokenizer, cfg = load_checkpoint(checkpoint)
    return model


def torch_generate(model, prompt: list[int], n: int):
    """transformers `generate`, greedy, exactly n new tokens."""
    import torch

    ids = torch.tensor([prompt])
    pad = model.token_ids.get("<pad>", 0)

    def run():
        with torch.no_grad():
            out = model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[0, len(prompt):].tolist()

    return run


def regression_ids(model, checkpoint: Path) -> list[int]:
    """The text-to-image prompt ending in [IMG], built by the prompt builder both sides share."""
    from tokenizers import Tokenizer

    from emu_edge.runtime.prompt import emu2_builder
    from emu_edge.training.tokenizer import encode_text_fn

    tok = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
    builder = emu2_builder(model.token_ids, encode_text_fn(tok), model.cfg.n_query, model.cfg.frame_n_query)
    return builder.encode("text_to_image", [("text", PROMPT)], generate="image").ids


def emu2_reference_regress(model, ids: list[int], n: int):
    """Emu2's released generation loop: for each of the n embeddings, the whole decoder over
    the whole sequence so far, no KV cache; the last position's regression is projected up
    and appended."""
    import torch

    def run():
        with torch.no_grad():
            embeds = model.embed(torch.tensor([ids]), None)
            out = []
            for _ in range(n):
                hidden = model.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
                regressed = model.project_down(hidden[:, -1])
                out.append(regressed)
                embeds = torch.cat([embeds, model.project_up(regressed)[:, None]], dim=1)
            return torch.stack(out, 1)

    return run


def torch_kv_regress(model, ids: list[int], n: int):
    """The same loop with transformers' KV cache (training/generate.py's reference)."""
    import torch
    from transformers import DynamicCache

    image_id = torch.tensor([[model.token_ids["<image>"]]])

    def run():
        with torch.no_grad():
            cache = DynamicCache()
            _, reg, _ = model.decode(model.embed(torch.tensor([ids]), None), past_key_values=cache, use_cache=True)
            reg = reg[0, -1]
            out = [reg]
            for _ in range(n - 1):
                _, reg, _ = model.decode(model.embed(image_id, reg[None]), past_key_values=cache, use_cache=True)
                reg = reg[0, -1]
                out.append(reg)
            return torch.stack(out)

    return run


def torch_denoise(model, cond: np.ndarray, steps: int):
    """The diffusers-style loop (training/generate.py): cond and uncond in one batched
    U-Net call per step, DDIM."""
    import torch

    from emu_edge.training.generate import sample_images

    c = torch.from_numpy(cond)
    return lambda: sample_images(model, c, steps=steps, guidance=3.0, seed=0, scheduler="ddim")


# -- Emu3 image generation ------------------------------------------------------------------


class ImagePeer:
    """One image in two parts, for interleave: `tokens()` (the decoder loop) then
    `pixels(tokens)` (VQ decode and postprocess). Every call keeps the seconds of its pixel
    part, and the last call's tokens, so one set of rounds gives the time per image, the VQ
    decode's share of it, and the token rate."""

    def __init__(self, tokens, pixels):
        self.tokens, self.pixels = tokens, pixels
        self.pixel_seconds: list[float] = []
        self.last_tokens: list[int] = []

    def __call__(self):
        import time

        ids = self.tokens()
        start = time.perf_counter()
        self.pixels(ids)
        self.pixel_seconds.append(time.perf_counter() - start)
        self.last_tokens = [int(t) for t in np.asarray(ids).reshape(-1)]


def image_tokens(rows: int, cols: int) -> int:
    """Tokens generated for an image of rows x cols codes: each row and its EOL, then EOF."""
    return rows * (cols + 1) + 1


def emu3_torch_model(folder: Path, threads: int):
    import torch
    from transformers import Emu3ForConditionalGeneration

    torch.set_num_threads(threads)
    return Emu3ForConditionalGeneration.from_pretrained(folder).eval()


def emu3_prefix_allowed(model, rows: int, cols: int):
    """The row constraint for `generate` as transformers' Emu3 docs write it, with the
    model's own vocabulary map: counted from the image wrapper token, cols visual ids then
    EOL per row, then EOF (the docs go on to EOI, EOS and padding, never reached here)."""
    import torch

    vocab = model.config.vocabulary_map
    visual = model.vocabulary_mapping.image_tokens
    wrapper, eol, eof = vocab["<|image token|>"], vocab["<|extra_200|>"], vocab["<|extra_201|>"]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (cols + 1) == 0:
            return [eol]
        if offset == (cols + 1) * rows + 1:
            return [eof]
        return visual

    return allowed


def emu3_torch_image(model, folder: Path, prompt: list[int], negative: list[int], rows: int, cols: int,
                     guidance: float) -> ImagePeer:
    """transformers' Emu3 image generation: greedy `generate` under the row constraint,
    guidance through its own classifier-free guidance (guidance_scale with
    negative_prompt_ids: UnbatchedClassifierFreeGuidanceLogitsProcessor, a second forward
    per step on its own KV cache, after the conditional one), stopped after EOF as ours
    is; then decode_image_tokens and the image processor's postprocess to PIL."""
    import torch
    from transformers import Emu3ImageProcessor

    processor = Emu3ImageProcessor.from_pretrained(folder)
    vocab = model.config.vocabulary_map
    ids = torch.tensor([prompt])
    extra = {}
    if guidance != 1:
        neg = torch.tensor([negative])
        extra = dict(negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg))
    allowed = emu3_prefix_allowed(model, rows, cols)
    # decode_image_tokens drops the last three ids of the docs' sequence (EOF, EOI, EOS);
    # generation stopped at EOF, so the two it never reads are appended.
    tail = torch.tensor([[vocab["<|image end|>"], model.config.text_config.eos_token_id]])

    def tokens():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=image_tokens(rows, cols), guidance_scale=guidance,
                                 prefix_allowed_tokens_fn=allowed, **extra)
        return out[:, ids.shape[1]:]

    def pixels(new):
        with torch.no_grad():
            values = model.decode_image_tokens(image_tokens=torch.cat([new, tail], dim=1), height=rows, width=cols)
        return processor.postprocess(list(values.float()), return_tensors="PIL.Image.Image")["pixel_values"]

    return ImagePeer(tokens, pixels)


def ours_image(pipe, prompt: str, negative: str, height: int, width: int, guidance: float) -> ImagePeer:
    """The runtime's image generation, greedy, in the two calls generate_image makes:
    image_ids (cond and uncond rows in one batched decoder session) and decode_image_ids."""
    rows, cols = pipe.image_codes_size(height, width)

    def tokens():
        return pipe.image_ids([prompt], height, width, guidance=guidance, negative_prompt=negative, top_k=1, seed=0)

    return ImagePeer(tokens, lambda ids: pipe.decode_image_ids(ids, rows, cols))


# -- onnxruntime-genai ----------------------------------------------------------------------


def genai_available() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        return f"onnxruntime-genai is not installed (pip install 'emu-edge[bench]'): {e}"
    return None


def genai_build(checkpoint: Path, precisions: tuple[str, ...], work: Path, threads: int) -> dict[str, Path]:
    """onnxruntime-genai's model builder on a copy of the checkpoint's llm/ folder (the
    checkpoint itself is never touched), CPU, fp32 and/or int4 (block 32, accuracy level 4).
    The builds run side by side (separate processes). Returns precision -> model folder."""
    outs = {p: work / f"genai-{p}" for p in precisions}
    running = {}
    for precision, out in outs.items():
        if _done(out):
            continue
        shutil.rmtree(out, ignore_errors=True)
        llm = work / f"genai-input-{precision}" / "llm"
        shutil.rmtree(llm.parent, ignore_errors=True)
        shutil.copytree(Path(checkpoint) / "llm", llm)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llm), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(work / f"genai-cache-{precision}")]
        if precision == "int4":
            cmd += ["--extra_options", f"block_size={GENAI_BLOCK_SIZE}", f"accuracy_level={GENAI_ACCURACY_LEVEL}"]
        running[precision] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    failures = []
    for precision, process in running.items():
        _, stderr = process.communicate()
        shutil.rmtree(work / f"genai-input-{precision}", ignore_errors=True)
        shutil.rmtree(work / f"genai-cache-{precision}", ignore_errors=True)
        if process.returncode:
            failures.append(f"{precision}: {stderr[-2000:]}")
        else:
            _mark_done(outs[precision])
    if failures:
        raise PeerUnavailable(f"onnxruntime-genai's builder failed on {checkpoint / 'llm'}:\n" + "\n".join(failures))
    for out in outs.values():
        # The thread count is a session option in genai_config.json: the same as every peer's.
        config_file = out / "genai_config.json"
        config = json.loads(config_file.read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        config_file.write_text(json.dumps(config, indent=4))
    return outs


def genai_generate(model_dir: Path, prompt: list[int], n: int):
    """onnxruntime-genai's own loop: append the prompt, generate_next_token until done."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokens = np.asarray(prompt, dtype=np.int32)

    def run():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokens)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(prompt):]]

    return run


# -- the machine ----------------------------------------------------------------------------


def _readers(threads: int, nbytes: int) -> tuple[dict, int]:
    """Ways to read a float32 buffer of `nbytes` once, `threads` threads: ({name: call},
    bytes read per call). onnxruntime ReduceSum, onnxruntime MatMul [1, K] x [K, N] (a GEMV,
    the decode step's own kernel, with the matrix fed as an input so it is read as stored),
    numpy sum, and torch sum and GEMV where torch is installed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 4096
    n = nbytes // 4 // k
    x = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    v = np.ones((1, k), np.float32)

    def session(node, inputs, output_shape):
        graph = helper.make_graph([node], "read", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                        output_shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 9
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    matrix = helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, n])
    reduce = session(helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0), [matrix], [])
    gemv = session(helper.make_node("MatMul", ["v", "x"], ["y"]),
                   [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, k]), matrix], [1, n])
    bindings = []
    for sess, feeds in ((reduce, {"x": x}), (gemv, {"v": v, "x": x})):
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("y")
        bindings.append((sess, binding))
    readers = {"onnxruntime_reducesum": lambda: bindings[0][0].run_with_iobinding(bindings[0][1]),
               "onnxruntime_gemv": lambda: bindings[1][0].run_with_iobinding(bindings[1][1]),
               "numpy_sum": x.sum}
    try:
        import torch

        torch.set_num_threads(threads)
        tx, tv = torch.from_numpy(x), torch.from_numpy(v)
        readers["torch_sum"] = tx.sum
        readers["torch_gemv"] = lambda: tv @ tx
    except ImportError:
        pass
    return readers, x.nbytes


def memory_bandwidth(threads: int, nbytes: int, repeat: int = 7) -> dict:
    """Read bandwidth in bytes/s over a float32 buffer of `nbytes`, read again and again (as a
    decoder reads its weights at every step), `threads` threads: the best of the `_readers`,
    each the best of `repeat` passes, since the hardware's limit is what the fastest of them
    reaches (reductions alone fall well short of it here)."""
    import time

    readers, size = _readers(threads, nbytes)

    def best(fn) -> float:
        fn()
        fastest = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - start)
        return size / fastest

    found = {name: best(fn) for name, fn in readers.items()}
    return {"bytes": size, "threads": threads, **found, "best": max(found.values()),
            "best_kernel": max(found, key=found.get)}


def read_passes(threads: int, nbytes: int, kernel: str, passes: int = 16):
    """A call that reads a buffer of `nbytes` `passes` times with `kernel` (a `_readers`
    name), for the interleaved rounds: timed beside the peers, it sees the machine as they
    do, so the bound it gives drifts with them. Returns (call, bytes read per call)."""
    readers, size = _readers(threads, nbytes)
    read = readers[kernel]

    def run():
        for _ in range(passes):
            read()

    return run, size * passes


def last_level_cache_bytes(default: int = 32 * 1024 * 1024) -> int:
    """The largest CPU cache (Linux sysfs); `default` where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=default)


def weight_bytes_per_token(decoder_onnx: Path) -> int:
    """Bytes of the weights every decode step reads: the initializers that feed MatMul (or
    MatMulNBits) and Gemm nodes. Rotary tables and norms are left out (one row, or tiny)."""
    import onnx

    model = onnx.load(str(decoder_onnx))
    init = {t.name: t for t in model.graph.initializer}
    used = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            used.update(name for name in node.input[1:] if name in init)
    return sum(len(onnx.numpy_helper.to_array(init[name]).tobytes()) for name in used)
