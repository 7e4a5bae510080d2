"""`emu-edge export-hf --llm` + the torch-free runtime, against transformers' generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import LLM_PRESETS, make_llm_folder, make_qwen2_folder
from emu_edge.cli import main as cli_main
from emu_edge.runtime.backends import BackendError, create_backend
from emu_edge.runtime.bundle import Bundle, BundleError
from emu_edge.runtime.decoder import ContextTooLongError, DecoderError, KVCache
from emu_edge.runtime.manifest import KVSpec
from emu_edge.runtime.pipeline import Pipeline
from emu_edge.runtime.sampling import Sampler, SamplingConfig

NEW_TOKENS = 64
EXPORTS = [(p, "auto") for p in LLM_PRESETS] + [("gqa", "standard")]


def export(llm: Path, out: Path, *extra: str) -> int:
    return cli_main(["export-hf", "--llm", str(llm), "--out", str(out), "--max-length", "160", *extra])


@pytest.fixture(scope="module")
def bundles(llm_folders, tmp_path_factory):
    made = {}

    def get(preset: str, attention: str = "auto") -> Path:
        key = (preset, attention)
        if key not in made:
            out = tmp_path_factory.mktemp("bundles") / f"{preset}-{attention}"
            assert export(llm_folders(preset), out, "--attention", attention) == 0
            made[key] = out
        return made[key]

    return get


def _hf_model(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


def _hf_greedy(model, prompt: list[int], new_tokens: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    scores = torch.stack(out.scores, 1)[0]
    top2 = scores.topk(2, dim=-1).values
    return out.sequences[0, len(prompt):].tolist(), float((top2[:, 0] - top2[:, 1]).min())


def _varied_prompt(model, seed0: int = 0):
    """The first seeded prompt whose greedy continuation is 64 tokens, varied and decisive."""
    for seed in range(seed0, seed0 + 20):
        prompt = np.random.default_rng(seed).integers(3, model.config.vocab_size, 7).tolist()
        ref, gap = _hf_greedy(model, prompt, NEW_TOKENS)
        if len(ref) == NEW_TOKENS and len(set(ref)) >= 8 and len(set(ref[-16:])) > 2 and gap > 1e-3:
            return prompt, ref
    pytest.fail("no seeded prompt gives a varied, decisive 64-token greedy sequence")


@pytest.mark.parametrize("preset,attention", EXPORTS, ids=[f"{p}-{a}" for p, a in EXPORTS])
def test_greedy_matches_transformers_token_for_token(preset, attention, llm_folders, bundles):
    model = _hf_model(llm_folders(preset))
    prompt, ref = _varied_prompt(model)
    pipe = Pipeline.load(bundles(preset, attention), threads=2)
    expected = "gqa" if attention == "gqa" or (attention == "auto" and preset != "head24") else "standard"
    assert pipe.manifest.model.kv.attention == expected
    assert pipe.generate_ids(prompt, NEW_TOKENS, ignore_eos=True) == ref


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    return make_qwen2_folder(tmp_path_factory.mktemp("qwen2") / "llm")


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_qwen2_greedy_matches_transformers_token_for_token(attention, qwen2_folder, tmp_path):
    """A second architecture through the same command: Qwen2's q/k/v biases come in by its
    adapter (export/adapters.py), the graph and runtime are the Llama ones."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(qwen2_folder).eval()
    prompt, ref = _varied_prompt(model, seed0=40)
    assert export(qwen2_folder, tmp_path / "bundle", "--attention", attention) == 0
    pipe = Pipeline.load(tmp_path / "bundle", threads=2)
    assert pipe.manifest.model.architecture == "Qwen2ForCausalLM"
    assert pipe.manifest.model.kv.attention == attention
    assert pipe.generate_ids(prompt, NEW_TOKENS, ignore_eos=True) == ref


@pytest.mark.parametrize("attention", ["auto", "standard"])
def test_batched_prompts_give_the_same_tokens_as_each_alone(attention, bundles):
    pipe = Pipeline.load(bundles("gqa", attention), threads=2)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 12, 1, 8)]
    alone = [pipe.generate_ids(p, 24, ignore_eos=True) for p in prompts]
    assert pipe.generate_ids(prompts, 24, ignore_eos=True) == alone


def test_stops_at_eos_like_transformers(tmp_path):
    # Same weights with an EOS the model actually emits: the token greedy picks 10th.
    folder = make_llm_folder(tmp_path / "llm", "mha", seed=5)
    model = _hf_model(folder)
    prompt = [5, 9, 200, 31]
    free, _ = _hf_greedy(model, prompt, 32)
    eos = free[9]
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink()
    ref, _ = _hf_greedy(_hf_model(folder), prompt, 32)
    assert ref[-1] == eos and len(ref) <= 10
    assert export(folder, tmp_path / "bundle") == 0
    pipe = Pipeline.load(tmp_path / "bundle")
    assert pipe.manifest.model.eos_token_id == eos
    assert pipe.generate_ids(prompt, 32) == ref
    assert len(pipe.generate_ids(prompt, 32, ignore_eos=True)) == 32


@pytest.mark.parametrize("attention", ["auto", "standard"])
def test_continuing_a_conversation_prefills_only_the_new_turn(attention, bundles):
    pipe = Pipeline.load(bundles("gqa", attention))
    rng = np.random.default_rng(3)
    first, second = rng.integers(3, 256, 9).tolist(), rng.integers(3, 256, 6).tolist()
    session = pipe.session(1)
    session.prefill([first])
    continued = session.extend([second]).logits
    assert session.lengths.tolist() == [15]
    whole = pipe.session(1).prefill([first + second]).logits
    np.testing.assert_allclose(continued, whole, rtol=0, atol=1e-4 * np.abs(whole).max())


@pytest.mark.parametrize("attention", ["auto", "standard"])
def test_batched_continuation_matches_each_row_alone(attention, bundles):
    pipe = Pipeline.load(bundles("gqa", attention))
    rng = np.random.default_rng(4)
    firsts = [rng.integers(3, 256, n).tolist() for n in (4, 10)]
    seconds = [rng.integers(3, 256, 3).tolist() for _ in range(2)]
    session = pipe.session(2)
    session.prefill(firsts)
    continued = session.extend(seconds).logits
    assert session.lengths.tolist() == [7, 13]
    for b in range(2):
        alone = pipe.session(1).prefill([firsts[b] + seconds[b]]).logits[0]
        np.testing.assert_allclose(continued[b], alone, rtol=0, atol=1e-4 * np.abs(alone).max())


def _alone(pipe, prompt: list[int], steps: int, config: SamplingConfig) -> tuple[list[int], list[np.ndarray]]:
    """A prompt's tokens and the logits they were drawn from, in a session of its own."""
    session, sampler = pipe.session(1), Sampler(config)
    out, tokens, logits = session.prefill([prompt]), [], []
    for _ in range(steps):
        logits.append(out.logits[0].copy())
        tokens.append(int(sampler(out.logits, [prompt + tokens])[0]))
        out = session.step([tokens[-1]])
    return tokens, logits


@pytest.mark.parametrize("attention", ["auto", "standard"])
def test_rows_joining_and_leaving_a_running_batch_match_each_alone(attention, bundles):
    """Prompts prefilled one at a time into free rows of a running 3-row session
    (prefill_row) while the others decode, stepped together over the first k rows, and
    freed when done (free_row; a free row below a busy one runs empty): each row's logits
    and tokens, greedy and sampled by seed, are what it gets alone."""
    pipe = Pipeline.load(bundles("gqa", attention))
    rng = np.random.default_rng(12)
    sampled = SamplingConfig(do_sample=True, temperature=1.3, top_k=40)
    # (joins at step, prompt, tokens, seed or None for greedy)
    plan = [(0, rng.integers(3, 256, 9).tolist(), 6, None), (0, rng.integers(3, 256, 4).tolist(), 20, 7),
            (2, rng.integers(3, 256, 15).tolist(), 12, None), (7, rng.integers(3, 256, 6).tolist(), 10, 8),
            (9, rng.integers(3, 256, 2).tolist(), 8, None)]
    alone = [_alone(pipe, prompt, n, SamplingConfig() if seed is None else replace(sampled, seed=seed))
             for _, prompt, n, seed in plan]
    session = pipe.session(3)
    samplers = {None: Sampler(), "seeded": Sampler(sampled)}
    rows: dict[int, dict] = {}      # slot -> the request in it
    got: dict[int, list[int]] = {}
    widths, holes_run = [], 0
    for step in range(60):
        for r, (at, prompt, n, seed) in enumerate(plan):
            if at <= step and r not in got and len(rows) < 3:
                slot = min(set(range(3)) - set(rows))
                out = session.prefill_row(slot, prompt)
                assert out.logits.shape == (1, pipe.manifest.model.vocab_size)
                rows[slot] = {"r": r, "logits": out.logits[0], "generator": None if seed is None else
                              np.random.default_rng(seed)}
                got[r] = []
        if not rows and len(got) == len(plan):
            break
        for slot, row in sorted(rows.items()):
            r = row["r"]
            np.testing.assert_allclose(row["logits"], alone[r][1][len(got[r])], rtol=0,
                                       atol=1e-5 * np.abs(alone[r][1][len(got[r])]).max())
            generators = None if row["generator"] is None else [row["generator"]]
            sampler = samplers[None if generators is None else "seeded"]
            got[r].append(int(sampler(row["logits"][None].copy(), [plan[r][1] + got[r]], None, generators)[0]))
        for slot in [s for s, row in rows.items() if len(got[row["r"]]) == plan[row["r"]][2]]:
            del rows[slot]
            session.free_row(slot)
        if rows:
            k = max(rows) + 1
            holes_run += k - len(rows)
            widths.append(k)
            tokens = np.zeros(k, np.int64)
            for slot, row in rows.items():
                tokens[slot] = got[row["r"]][-1]
            out = session.step(tokens, rows=k)
            for slot, row in rows.items():
                row["logits"] = out.logits[slot]
            assert all(session.lengths[slot] == 0 for slot in range(3) if slot not in rows)   # free rows stay empty
    assert [got[r] for r in range(len(plan))] == [tokens for tokens, _ in alone]
    # the plan does what it says: narrower steps than the session, and a free row run empty
    assert min(widths) < 3 and max(widths) == 3 and holes_run > 0


def test_row_verbs_refuse_what_they_cannot_do(bundles):
    pipe = Pipeline.load(bundles("gqa"), max_length=40)
    session = pipe.session(2)
    with pytest.raises(DecoderError, match="not one of this session's 2 rows"):
        session.prefill_row(2, [5, 6])
    with pytest.raises(DecoderError, match="rows must be in 1..2"):
        session.step([5, 6, 7], rows=3)
    with pytest.raises(ContextTooLongError, match="max_length 40"):
        session.prefill_row(1, list(range(3, 50)))
    session.prefill_row(0, [5, 6, 7])
    with pytest.raises(DecoderError, match=r"one token id per row \(1\)"):
        session.step([5, 6], rows=1)
    assert session.lengths.tolist()[0] == 3


def test_generate_text_and_sampling(bundles):
    pipe = Pipeline.load(bundles("gqa"))
    text = pipe.generate_text("w5 w6 w7", max_new_tokens=8, ignore_eos=True)
    assert len(text.split()) == 8 and all(w.startswith("w") or w.startswith("<") for w in text.split())
    prompt = [1, 40, 41]
    a = pipe.generate_ids(prompt, 16, do_sample=True, temperature=1.5, top_k=50, seed=3, ignore_eos=True)
    b = pipe.generate_ids(prompt, 16, do_sample=True, temperature=1.5, top_k=50, seed=3, ignore_eos=True)
    assert a == b and a != pipe.generate_ids(prompt, 16, ignore_eos=True)


# -- limits ----------------------------------------------------------------------------


def test_kv_cache_refuses_what_memory_cannot_hold(bundles):
    pipe = Pipeline.load(bundles("gqa"))
    kv = pipe.manifest.model.kv
    with pytest.raises(DecoderError) as info:
        KVCache(pipe.backends["decoder"], kv, batch=1, max_length=10**9)
    message = str(info.value)
    assert "max_length 1000000000" in message and "GiB" in message and "MemAvailable" in message
    need = KVSpec.bytes_for(kv, 1, 10**9) / 1024**3
    assert f"{need:.2f} GiB" in message


def test_kv_cache_starts_zeroed(bundles):
    # The standard graph multiplies masked cache rows by probabilities of exactly 0, so the
    # rows a ragged batch has not written yet must hold finite values: 0 x NaN is NaN.
    pipe = Pipeline.load(bundles("gqa", "standard"))
    cache = KVCache(pipe.backends["decoder"], pipe.manifest.model.kv, batch=2, max_length=32)
    for key, value in cache.buffers:
        assert not key.numpy().any() and not value.numpy().any()


def test_context_limits_are_named(bundles):
    path = bundles("gqa")
    with pytest.raises(ValueError, match="1..160"):
        Pipeline.load(path, max_length=1000)
    pipe = Pipeline.load(path, max_length=40)
    with pytest.raises(ContextTooLongError, match="max_length 40"):
        pipe.generate_ids(list(range(3, 33)), 20)
    session = pipe.session(1)
    with pytest.raises(ContextTooLongError, match="max_length 40"):
        session.prefill([list(range(3, 44))])


# -- bundle checks -----------------------------------------------------------------------


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundles("gqa"), target)
    return target


def test_unknown_schema_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema_version 99; this runtime reads schema version\(s\) 3"):
        Bundle.open(bundle_copy)


def test_a_v1_bundle_is_refused_with_how_to_re_export(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema_version 1, written by an older emu-edge.*Re-export the bundle "
                                          r"with this version \(emu-edge export CHECKPOINT --out BUNDLE"):
        Bundle.open(bundle_copy)


def test_missing_manifest_field_is_named(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["graphs"]["decoder"]["sha256"]
    del manifest["model"]["kv"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="decoder is missing the field.s. sha256"):
        Bundle.open(bundle_copy)


def test_sha256_mismatch_names_the_file(bundle_copy):
    with open(bundle_copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder\.onnx does not match the sha256"):
        Bundle.open(bundle_copy)


def test_missing_graph_file_is_named(bundle_copy):
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx \(graph 'decoder'\) is missing"):
        Bundle.open(bundle_copy)


def test_corrupt_tokenizer_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"tokenizer\.json is not a readable tokenizer"):
        Bundle.open(bundle_copy)


def test_old_onnxruntime_is_told_which_version_it_needs(bundles):
    with pytest.raises(BundleError, match=r"decoder\.onnx .* needs onnxruntime >= 1\.20; onnxruntime 1\.18\.1"):
        Bundle.open(bundles("gqa"), onnxruntime_version="1.18.1")
    Bundle.open(bundles("gqa", "standard"), onnxruntime_version="1.16.3")


def test_backend_errors_are_clear(bundles):
    path = Bundle.open(bundles("gqa")).graph_path("decoder")
    with pytest.raises(BackendError, match="tensorrt"):
        create_backend(path, backend="tensorrt")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="CPUExecutionProvider"):
            create_backend(path, device="cuda")


def test_a_pipeline_without_spinning_runs_every_graph_without_it_and_answers_the_same(bundles):
    key = "session.intra_op.allow_spinning"
    spinning, still = (Pipeline.load(bundles("gqa"), spin=spin) for spin in (True, False))
    assert still.graph("decoder").session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match=key):   # not set: onnxruntime's default, spinning
        spinning.graph("decoder").session.get_session_options().get_session_config_entry(key)
    prompts = np.random.default_rng().integers(3, spinning.manifest.model.vocab_size, (2, 9)).tolist()
    assert spinning.generate_ids(prompts, 12, ignore_eos=True) == still.generate_ids(prompts, 12, ignore_eos=True)


# -- export errors ----------------------------------------------------------------------


def test_export_errors_name_the_problem(llm_folders, tmp_path, capsys):
    good = llm_folders("gqa")

    def fails(folder: Path, *expected: str, out: Path | None = None) -> None:
        out = out or tmp_path / "never"
        before = sorted(out.iterdir()) if out.exists() else None
        assert export(folder, out) == 1
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert (sorted(out.iterdir()) if out.exists() else None) == before, "a failed export touched --out"
        assert not list(out.parent.glob(f".{out.name}.partial-*")), "a failed export left a partial bundle"

    fails(tmp_path / "nope", "nope does not exist")

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    fails(broken, "model.safetensors is not a readable safetensors file")

    shutil.copytree(good, broken, dirs_exist_ok=True)
    (broken / "config.json").write_text("{")
    fails(broken, "config.json is not valid JSON")

    shutil.copytree(good, broken, dirs_exist_ok=True)
    config = json.loads((good / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    fails(broken, "MistralForCausalLM", "supported: LlamaForCausalLM")

    shutil.copytree(good, broken, dirs_exist_ok=True)
    (broken / "tokenizer.json").unlink()
    fails(broken, "tokenizer.json does not exist")

    existing = tmp_path / "existing"
    existing.mkdir()
    fails(good, "already exists", "--overwrite", out=existing)
    assert export(good, existing, "--overwrite") == 0
    assert Bundle.open(existing).manifest.model.vocab_size == 256


# -- torch-free import -------------------------------------------------------------------


def test_runtime_runs_with_torch_blocked(bundles):
    path = bundles("gqa")
    expected = Pipeline.load(path).generate_ids([1, 7, 99, 4], 12, ignore_eos=True)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import emu_edge.runtime
from emu_edge.runtime.pipeline import Pipeline
from emu_edge.runtime.sampling import Sampler, SamplingConfig
ids = Pipeline.load({str(path)!r}).generate_ids([1, 7, 99, 4], 12, ignore_eos=True)
heavy = sorted(m for m in ("transformers", "onnx", "diffusers", "safetensors") if m in sys.modules)
print(ids, heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{expected} []"
