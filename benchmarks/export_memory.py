"""Peak memory of `emu-edge export-hf` on a random Emu3 folder of about 1B text-model
parameters, and what an 8B export needs.

    OMP_NUM_THREADS=1 python -m benchmarks.export_memory [--work DIR] [--json FILE]

It writes random `Emu3ForConditionalGeneration` folders (save_pretrained in bfloat16, as
the published folders are), runs `emu-edge export-hf FOLDER --out BUNDLE` on each in a
subprocess and reads its peak RSS and wall time. The emu_edge measured is the one this
interpreter imports, so another install (say, before a change) is measured by running
this file with its python. The folders stay in --work: a rerun exports the same weights.

Four exports:

- a tiny folder (tests/tiny_models.py): the fixed cost (Python, torch, transformers, onnx);
- the 1B folder: Emu3's vocabulary of 184,622 ids at half Emu3-8B's width, 6 layers, so
  its largest tensors (the embedding table and lm_head, 1.5 GB each at float32) have the
  proportions of the real ones; a tiny VQ-VAE. As a user runs it: the decoder (with the
  embedding table inside it, 4.2 GB) is over the 2 GB external data threshold, so its
  tensors stay in its data file as they were written;
- the same folder with the writer's threshold at 0 (set in-process): every graph's large
  tensors in external data, as an 8B export's decoder (34 GB) is, so what is held at once
  is the fixed cost and one tensor, `k` times its float32 size;
- a tiny text model with Emu3's own VQ-VAE (transformers' defaults): tracing the VQ graphs.

    8B peak ~ max(fixed + VQ-VAE at float32 + k * largest tensor at float32,
                  the VQ export)

(the VQ-VAE is loaded before the graphs are built and held throughout). Building the
folders takes about 3 GB of memory and 3 GB of disk; the 1B exports write 4.2 GB bundles.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Emu3's text model (transformers' Emu3TextConfig defaults: Emu3-8B).
EMU3_8B = dict(vocab_size=184622, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336)
# About 1B: Emu3's vocabulary and half its width, 6 layers.
EMU3_1B = dict(vocab_size=184622, hidden_size=2048, num_hidden_layers=6, num_attention_heads=16,
               num_key_value_heads=8, intermediate_size=5632)
MAX_LENGTH = "4096"     # the same for every run: only the rotary tables depend on it (a few MB)
_REPO = Path(__file__).resolve().parent.parent

# python -c _METER RESULT LOG CMD...: runs CMD (its output to LOG) and writes its peak RSS
# and wall time to RESULT as JSON. CMD starts from this small process: Linux counts what a
# child held before exec, which after fork or vfork is its parent's memory.
_METER = """
import json, resource, subprocess, sys, time
start = time.monotonic()
with open(sys.argv[2], "w") as log:
    rc = subprocess.call(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": rc, "wall_s": time.monotonic() - start, "peak_rss_bytes": usage.ru_maxrss * 1024}, out)
"""


def text_params(c: dict) -> dict:
    h, v, inter, layers = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * inter + 2 * h
    return {"total": 2 * v * h + layers * per_layer + h, "largest": v * h}


def vq_params() -> int:
    """Parameters of Emu3's own VQ-VAE (transformers' Emu3VQVAEConfig defaults)."""
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    with torch.device("meta"):
        model = Emu3VQVAE(Emu3VQVAEConfig())
    return sum(p.numel() for p in model.parameters())


def build_folder(path: Path, size: str) -> None:
    """A random Emu3ForConditionalGeneration saved in bfloat16 with tiny_models' tokenizer:
    "1b" EMU3_1B's text model and tiny_models' "f2" VQ-VAE, "vq" a tiny text model and
    Emu3's own VQ-VAE (transformers' defaults); "tiny" is tiny_models' "f2" folder."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3VQVAEConfig, GenerationConfig

    sys.path.insert(0, str(_REPO / "tests"))
    from tiny_models import BOS_ID, EOS_ID, PAD_ID, build_emu3_tokenizer, build_vq, make_emu3_folder

    if size == "tiny":
        make_emu3_folder(path, "f2")
        return
    vq = build_vq("f2") if size == "1b" else None
    vq_config = vq.config if vq is not None else Emu3VQVAEConfig()
    text = EMU3_1B if size == "1b" else dict(vocab_size=EMU3_8B["vocab_size"], hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)
    tok = build_emu3_tokenizer(vq_config.codebook_size, vocab_size=text["vocab_size"])
    config = Emu3Config(text_config=dict(text, rms_norm_eps=1e-5, max_position_embeddings=9216, pad_token_id=PAD_ID,
                                         bos_token_id=BOS_ID, eos_token_id=EOS_ID),
                        vq_config=vq_config.to_dict(), vocabulary_map=tok.get_vocab())
    config.architectures = ["Emu3ForConditionalGeneration"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)   # built in bfloat16: half the memory of float32
    model = Emu3ForConditionalGeneration(config).eval()
    if vq is not None:
        model.model.vqmodel.load_state_dict(vq.state_dict())
    model.generation_config = GenerationConfig(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save(str(partial / "tokenizer.json"))
    partial.rename(path)


def measure(cmd: list[str], folder: Path, out: Path) -> dict:
    """cmd, then the folder and the bundle: peak RSS, wall time and sizes."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_name(out.name + ".log")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        args = [*cmd, str(folder), "--out", str(out), "--max-length", MAX_LENGTH]
        subprocess.run([sys.executable, "-c", _METER, str(result), str(log), *args], check=True, cwd=_REPO)
        stats = json.loads(result.read_text())
    if stats["rc"] != 0:
        sys.exit(f"{' '.join(args)} failed (exit {stats['rc']}); its output is in {log}")
    return dict(stats, command=" ".join(args), folder_bytes=_size(folder, "*.safetensors"), bundle_bytes=_size(out))


def export_all_external(argv: list[str]) -> int:
    """`emu-edge export-hf ARGS` with external_data_threshold 0: every graph's large tensors
    go to its data file, as an 8B export's decoder does."""
    import functools

    from emu_edge.cli import main
    from emu_edge.export import hf_cli
    from emu_edge.export.bundle_writer import BundleWriter

    hf_cli.BundleWriter = functools.partial(BundleWriter, external_data_threshold=0)
    return main(["export-hf", *argv])


def _size(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "emu-edge-export-memory",
                        help="where the folders and bundles go (kept: a rerun reuses the folders)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    tiny, big, vq = args.work / "emu3-tiny", args.work / "emu3-1b", args.work / "emu3-vq"
    for folder, size in ((tiny, "tiny"), (big, "1b"), (vq, "vq")):
        if not folder.is_dir():
            print(f"building {folder} (random weights)")
            start = time.monotonic()
            # In a child: its memory goes back before anything is measured.
            subprocess.run([sys.executable, "-m", "benchmarks.export_memory", "--build", size, str(folder)],
                           check=True, cwd=_REPO)
            print(f"  built in {time.monotonic() - start:.0f} s")

    emu_edge = [sys.executable, "-m", "emu_edge.cli", "export-hf"]
    fixed = measure(emu_edge, tiny, args.work / "bundle-tiny")
    run = measure(emu_edge, big, args.work / "bundle-1b")
    external = measure([sys.executable, "-m", "benchmarks.export_memory", "--all-external"], big,
                       args.work / "bundle-1b-external")
    vq_run = measure(emu_edge, vq, args.work / "bundle-vq")
    small, large = text_params(EMU3_1B), text_params(EMU3_8B)
    k = (external["peak_rss_bytes"] - fixed["peak_rss_bytes"]) / (4 * small["largest"])
    vq_bytes = 4 * vq_params()
    decoder_phase = fixed["peak_rss_bytes"] + vq_bytes + k * 4 * large["largest"]
    estimate = max(decoder_phase, vq_run["peak_rss_bytes"])
    figures = {"fixed": fixed, "1b": run, "1b_all_external": external, "vq": vq_run,
               "text_params_1b": small["total"], "largest_1b": small["largest"], "text_params_8b": large["total"],
               "largest_8b": large["largest"], "k": k, "vq_bytes": vq_bytes, "estimate_8b_bytes": estimate,
               "decoder_8b_fp32_bytes": 4 * (large["total"] - large["largest"])}
    print(f"\n{run['command']}")
    print(f"  text model      {small['total'] / 1e9:.2f}B parameters; largest tensor {small['largest'] / 1e6:.0f}M "
          f"(embedding table / lm_head, {_gb(4 * small['largest'])} at float32)")
    print(f"  safetensors     {_gb(run['folder_bytes'])} (bfloat16)")
    print(f"  bundle          {_gb(run['bundle_bytes'])} (float32)")
    print(f"  wall time       {run['wall_s']:.0f} s")
    print(f"  peak RSS        {_gb(run['peak_rss_bytes'])}")
    print(f"  every graph's tensors in external data: peak RSS {_gb(external['peak_rss_bytes'])}, "
          f"{external['wall_s']:.0f} s")
    print(f"tiny folder:      peak RSS {_gb(fixed['peak_rss_bytes'])}, {fixed['wall_s']:.0f} s")
    print(f"Emu3's VQ-VAE ({vq_bytes / 4e6:.0f}M parameters), tiny text model: peak RSS "
          f"{_gb(vq_run['peak_rss_bytes'])}, {vq_run['wall_s']:.0f} s")
    print(f"\nEmu3-8B ({large['total'] / 1e9:.2f}B text parameters, largest tensor {large['largest'] / 1e6:.0f}M, "
          f"decoder {_gb(figures['decoder_8b_fp32_bytes'])} at float32, over 2 GB):")
    print(f"  building the decoder: fixed {_gb(fixed['peak_rss_bytes'])} + VQ-VAE at float32 {_gb(vq_bytes)} + "
          f"{k:.2f} x largest tensor at float32 {_gb(4 * large['largest'])} = {_gb(decoder_phase)}")
    print(f"  tracing the VQ graphs: {_gb(vq_run['peak_rss_bytes'])} (measured above)")
    print(f"  peak ~ {_gb(estimate)}: the largest tensor (lm_head, then the embedding table) dominates; the "
          "other weights go to the data file one tensor at a time")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build_folder(Path(sys.argv[3]), sys.argv[2])
    elif sys.argv[1:2] == ["--all-external"]:
        sys.exit(export_all_external(sys.argv[2:]))
    else:
        sys.exit(main())
