"""Training on the tiny preset: stages, checkpoints, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emu_edge.cli import main
from emu_edge.training.checkpoint import CheckpointError, load_checkpoint
from emu_edge.training.config import PRESETS, RENAMED_FIELDS, EmuConfig, get_preset
from emu_edge.training.train import train


def _tiny(steps: int, **overrides):
    cfg = get_preset("tiny")
    cfg.steps = {s: steps for s in cfg.steps}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _before_the_rename(config: dict) -> dict:
    """A config dict as emu.json and train_config.json held it before the decoder fields
    took the manifest's names."""
    old = {new: old for old, new in RENAMED_FIELDS.items()}
    return {old.get(k, k): v for k, v in config.items()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    step = json.loads((folder / "steps" / "latest.json").read_text())["step"]
    return load_file(str(folder / "steps" / step / "model.safetensors"))


def test_unknown_preset_lists_presets(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "huge", "--out", "x"])
    assert "huge" in str(e.value) and all(p in str(e.value) for p in PRESETS)


def test_checkpoint_layout_and_from_pretrained(tiny_checkpoint):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    ck = tiny_checkpoint
    for name in ("emu.json", "tokenizer.json", "projections.safetensors", "judge.onnx", "llm", "vision", "unet"):
        assert (ck / name).exists(), name
    # Every component loads with its own library's from_pretrained.
    LlamaForCausalLM.from_pretrained(ck / "llm")
    CLIPVisionModel.from_pretrained(ck / "vision")
    UNet2DConditionModel.from_pretrained(ck / "unet")
    # Safetensors, JSON and ONNX only: nothing that would need unpickling.
    # (metrics.jsonl and loss.png are the run's log beside it)
    allowed = {".safetensors", ".json", ".onnx", ".jsonl", ".png"}
    odd = [p for p in ck.rglob("*") if p.is_file() and p.suffix not in allowed]
    assert not odd, odd
    meta = json.loads((ck / "emu.json").read_text())
    assert meta["config"]["n_query"] == 4 and meta["config"]["hidden_size"] == 64
    # Each value once: the model's sizes live in "config" only.
    assert not {"n_query", "frame_n_query", "image_size", "visual_dim"} & meta.keys()
    assert set(meta["prompt"]["tokens"]) >= {"[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"}


def test_training_lowers_the_loss(tiny_checkpoint):
    rows = [json.loads(l) for l in (tiny_checkpoint / "metrics.jsonl").read_text().splitlines()]
    for stage in (0, 1, 2, 3):
        losses = [r["loss"] for r in rows if r["stage"] == stage]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"stage {stage} did not learn"
    assert (tiny_checkpoint / "loss.png").stat().st_size > 0


def test_config_with_the_old_names_loads_to_the_same_config():
    old = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}
    assert {RENAMED_FIELDS[k] for k in old} == {"hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                "intermediate_size"}
    cfg = EmuConfig.from_dict(old)
    decoder = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
    assert decoder == (64, 2, 4, 2, 128)
    for name in PRESETS:
        cfg = get_preset(name)
        written = _before_the_rename(json.loads(cfg.dumps()))
        assert "hidden" in written and "hidden_size" not in written
        assert EmuConfig.from_dict(written) == cfg
    # Both names for one field is ambiguous.
    with pytest.raises(ValueError, match="hidden_size"):
        EmuConfig.from_dict({**cfg.to_dict(), "hidden": 32})


def test_checkpoint_written_before_the_rename_loads(tiny_checkpoint, tmp_path):
    # emu.json then had the decoder fields under their old names and repeated n_query,
    # frame_n_query, image_size and visual_dim beside "config".
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old, ignore=shutil.ignore_patterns("steps"))
    meta = json.loads((old / "emu.json").read_text())
    config = meta["config"]
    meta = {"format": meta["format"], "version": meta["version"], "config": _before_the_rename(config),
            "n_query": config["n_query"], "frame_n_query": config["frame_n_query"],
            "image_size": config["image_size"], "visual_dim": config["vision_hidden"],
            **{k: v for k, v in meta.items() if k not in ("format", "version", "config")}}
    (old / "emu.json").write_text(json.dumps(meta, indent=2))
    _, _, cfg = load_checkpoint(old)
    assert cfg == load_checkpoint(tiny_checkpoint)[2]


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    # 4 steps per stage, a step folder every 2: interrupt after 10 steps (mid stage 2, with
    # optimizer state), resume, and finish; weights must equal an uninterrupted run's.
    stages = ["0", "1", "2", "3", "5"]
    full = train(_tiny(4, save_every=2), tmp_path / "full", stages, judge=False, progress=False)
    part = tmp_path / "part"
    train(_tiny(4, save_every=2), part, stages, stop_after=10, judge=False, progress=False)
    assert json.loads((part / "steps" / "latest.json").read_text())["step"] == "2-000002"
    # A half-written step folder from a kill mid-save is ignored.
    (part / "steps" / ".2-000004.tmp").mkdir()
    # A run started before the decoder fields were renamed resumes too.
    config = part / "train_config.json"
    config.write_text(json.dumps(_before_the_rename(json.loads(config.read_text())), indent=2))
    train(_tiny(4, save_every=2), part, stages, resume=True, judge=False, progress=False)
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_with_nothing_to_resume(tmp_path):
    with pytest.raises(SystemExit, match="nothing to resume"):
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "empty"), "--resume", "--steps", "1"])


def test_missing_and_corrupt_checkpoint_files_are_named(tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("steps"))
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_checkpoint(broken)
    (broken / "projections.safetensors").unlink()
    shutil.copy(tiny_checkpoint / "unet" / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(CheckpointError, match="projections.safetensors"):
        load_checkpoint(broken)
    (broken / "emu.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="emu.json"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = (
    "import sys; from emu_edge.training.train import train; from emu_edge.training.config import get_preset;"
    "cfg = get_preset('tiny'); cfg.steps = {s: 3 for s in cfg.steps}; cfg.save_every = 3;"
    "cfg.batch_size = int(sys.argv[2]);"
    "train(cfg, sys.argv[1], ['1', '2', '3', '5'], judge=False, progress=False)"
)


def test_ddp_two_ranks_match_one_process(tmp_path):
    # 2 ranks at global batch 8 (4 each) against 1 process at batch 8, over a text stage,
    # the diffusion stage and the joint (regression) stage.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([*args], check=True, env=env, capture_output=True)
    run(sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "one"), "8")
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "--no-python", sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "two"), "8")
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, worst
    # The check has teeth: a rank that trained on its half batch alone (no gradient sync)
    # ends far from the full-batch weights.
    run(sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "half"), "4")
    half = _weights(tmp_path / "half")
    assert max(float((one[k] - half[k]).abs().max()) for k in one) > 100 * max(worst, 1e-6)


EVAL_KEYS = ("caption_accuracy", "vqa_accuracy", "digit_accuracy", "t2i_attribute_accuracy", "t2i_shuffled_baseline",
             "judge_accuracy", "autoencode_similarity", "video_accuracy", "fewshot_accuracy", "chat_accuracy",
             "subject_accuracy")


def test_eval_writes_every_metric_and_reproduces_itself(tiny_checkpoint, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        assert main(["eval", str(tiny_checkpoint), "--scale", "0.03", "--steps", "4", "--json", str(out)]) == 0
    metrics = json.loads(first.read_text())
    for key in EVAL_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    parts = metrics["breakdown"]
    assert parts["t2i"]["both"] == metrics["t2i_attribute_accuracy"]
    for attributes in (parts["t2i"], parts["autoencode"]):
        assert attributes["both"] <= min(attributes["colour"], attributes["shape"])
    assert set(parts["vqa_by_question"]) <= {"colour", "shape", "size", "count", "position"}
    assert set(parts["vqa_by_objects"]) <= {"one object", "two objects"}
    assert first.read_text() == second.read_text()
    # A subset scores the same samples the same way: what else runs does not move it.
    part = tmp_path / "part.json"
    assert main(["eval", str(tiny_checkpoint), "--scale", "0.03", "--steps", "4", "--json", str(part),
                 "--only", "vqa,text_to_image"]) == 0
    subset = json.loads(part.read_text())
    assert set(subset["samples"]) == {"vqa", "text_to_image"}
    assert {k: v for k, v in subset.items() if k in EVAL_KEYS} == {
        k: metrics[k] for k in ("vqa_accuracy", "t2i_attribute_accuracy", "t2i_shuffled_baseline")}
    assert subset["breakdown"]["t2i"] == parts["t2i"]
    with pytest.raises(SystemExit, match="cooking"):
        main(["eval", str(tiny_checkpoint), "--only", "vqa,cooking"])


def test_ship_writes_fp16_weights_and_generation_defaults(tiny_checkpoint, tmp_path):
    from emu_edge.training.ship import ship

    out = ship(tiny_checkpoint, tmp_path / "shipped", generation={"guidance": 2.5})
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in unet.values())
    assert json.loads((out / "emu.json").read_text())["generation_defaults"]["guidance"] == 2.5
    assert not (out / "steps").exists() and (out / "judge.onnx").exists()
    model, _, _ = load_checkpoint(out)  # loads back as fp32
    assert next(model.unet.parameters()).dtype == torch.float32


def test_ship_from_an_unfinished_run_says_where_it_stopped(tmp_path):
    from emu_edge.training.ship import ship

    run = tmp_path / "run"
    train(_tiny(4, save_every=2), run, ["1", "2"], stop_after=6, judge=False, progress=False)
    config = run / "train_config.json"  # as a run started before the decoder fields were renamed wrote it
    config.write_text(json.dumps(_before_the_rename(json.loads(config.read_text())), indent=2))
    out = ship(run, tmp_path / "shipped")
    training = json.loads((out / "emu.json").read_text())["training"]
    assert training == {"last_step": "2-000002", "complete": False, "planned_steps": {"0": 4, "1": 4, "2": 4, "3": 4, "4": 4, "5": 4}}
    weights = _weights(run)
    model, _, _ = load_checkpoint(out)
    torch.testing.assert_close(model.unet.conv_in.weight, weights["unet.conv_in.weight"].half().float())


def test_branches_after_stage_1_join_into_one_shipped_model(tmp_path):
    # Stage 2 in one copy, stages 3-4 in another, both resumed from the same stage 1; the
    # shipped model takes the U-Net from the first and everything else from the second.
    import shutil

    from emu_edge.training.ship import ship

    trunk = tmp_path / "trunk"
    train(_tiny(3), trunk, ["0", "1"], judge=False, progress=False)
    shutil.copytree(trunk, tmp_path / "unet")
    train(_tiny(3), tmp_path / "unet", ["2"], resume=True, judge=False, progress=False)
    train(_tiny(3), trunk, ["3", "4"], resume=True, judge=False, progress=False)
    out = ship(trunk, tmp_path / "shipped", unet_from=tmp_path / "unet")
    model, _, _ = load_checkpoint(out)
    unet, main_run = _weights(tmp_path / "unet"), _weights(trunk)
    torch.testing.assert_close(model.unet.conv_in.weight, unet["unet.conv_in.weight"].half().float())
    assert not torch.equal(unet["unet.conv_in.weight"], main_run["unet.conv_in.weight"])  # stage 2 did train it
    head = model.llm.lm_head.weight
    torch.testing.assert_close(head, main_run["llm.lm_head.weight"].half().float())
    info = json.loads((out / "emu.json").read_text())["training"]
    assert info["unet_from"]["run"] == str(tmp_path / "unet") and info["unet_from"]["complete"]

    # A U-Net trained on another encoder's embeddings is refused.
    other = tmp_path / "other"
    train(_tiny(3, seed=1), other, ["0", "1", "2"], judge=False, progress=False)
    with pytest.raises(CheckpointError, match="different vision encoder"):
        ship(trunk, tmp_path / "bad", unet_from=other)


def test_init_from_continues_a_shipped_model_with_later_stages(tmp_path):
    from emu_edge.training.ship import ship

    run = train(_tiny(3), tmp_path / "run", ["0", "1", "2", "3"], progress=False)
    shipped = ship(run, tmp_path / "shipped")
    start, _, _ = load_checkpoint(shipped)
    more = train(_tiny(3), tmp_path / "more", ["4", "5"], progress=False, init_from=shipped)
    model, _, _ = load_checkpoint(more)
    # Stages 4-5 never train the encoder: it is the shipped one, so the weights did start there.
    for k, v in start.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(model.unet.conv_in.weight, start.unet.conv_in.weight)  # stage 5 trained it
    assert not torch.equal(model.llm.lm_head.weight, start.llm.lm_head.weight)  # stage 4 trained it
    assert json.loads((more / "emu.json").read_text())["training"]["init_from"] == str(shipped)
    again = ship(more, tmp_path / "again")  # shipping keeps the provenance
    assert json.loads((again / "emu.json").read_text())["training"]["init_from"] == str(shipped)
    assert (more / "judge.onnx").read_bytes() == (shipped / "judge.onnx").read_bytes()

    # Another architecture is refused, naming what differs.
    with pytest.raises(CheckpointError, match="hidden_size"):
        train(_tiny(1, hidden_size=32), tmp_path / "bad", ["4"], progress=False, init_from=shipped)


def test_seed_chooses_the_data_stream(tmp_path):
    # A continuation given a new seed sees new samples; the seed is kept for --resume.
    from emu_edge.training.train import global_samples

    captions = lambda seed: [s.segments[-1].value for s in global_samples(_tiny(1, seed=seed), "1", 0)]
    assert captions(0) != captions(1)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--stages", "1", "--steps", "1",
                 "--seed", "7", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "emu.json").read_text())["config"]["seed"] == 7


def test_mix_replaces_the_stage_mixture(tmp_path):
    from emu_edge.training.train import STAGES, global_samples

    assert {s.task for s in global_samples(_tiny(1, mixes={"4": {"vqa": 1.0}}), "4", 3)} == {"vqa"}
    assert len({s.task for s in global_samples(_tiny(1), "4", 3)}) > 1 and set(STAGES["4"].tasks) != {"vqa"}
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--stages", "4", "--steps", "1", "--lr", "3e-4",
                 "--mix", "vqa=3,chat=1", "--no-progress"]) == 0
    config = json.loads((run / "emu.json").read_text())["config"]
    assert config["mixes"] == {"4": {"vqa": 3.0, "chat": 1.0}} and config["lr"]["4"] == 3e-4
    # A resumed run that would draw other samples is refused, naming what differs.
    with pytest.raises(SystemExit, match="mixes"):
        main(["train", "--preset", "tiny", "--out", str(run), "--stages", "4", "--steps", "2", "--resume",
              "--mix", "vqa=1", "--no-progress"])


@pytest.mark.parametrize("mix, message", [("vqa=1,cooking=2", "cooking"), ("vqa=x", "not a number"),
                                          ("vqa", "TASK=WEIGHT"), ("vqa=-1", "TASK=WEIGHT"),
                                          ("vqa=0", "positive sum")])
def test_bad_mix_is_refused_by_name(mix, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--stages", "4", "--mix", mix])


def test_mix_names_one_stage(tmp_path):
    with pytest.raises(SystemExit, match="one stage"):
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--stages", "3,4", "--mix", "vqa=1"])


def test_length_chunks_give_the_padded_batch_gradient(tiny_checkpoint):
    # Stage 4 mixes short and long sequences; chunks sorted by length pad less, and their
    # summed gradients must equal the whole batch's.
    from emu_edge.runtime.prompt import emu2_builder
    from emu_edge.training.tokenizer import encode_text_fn
    from emu_edge.training.train import STAGES, StageLoss, make_batch

    model, tokenizer, cfg = load_checkpoint(tiny_checkpoint)
    model.float().train()
    builder = emu2_builder(model.token_ids, encode_text_fn(tokenizer), cfg.n_query, cfg.frame_n_query)
    step = int(torch.randint(1000, ()))
    grads = []
    for chunks in (1, 4):
        cfg.text_chunks = chunks
        batch, counts = make_batch(cfg, "4", step, 0, 1, builder, 0, model)
        assert len(batch) == chunks
        model.zero_grad(set_to_none=True)
        for chunk in batch:
            StageLoss(model, STAGES["4"], builder)(chunk, counts)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.llm.parameters() if p.grad is not None]))
    lengths = [c.input_ids.shape[1] for c in batch]
    assert lengths == sorted(lengths)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_alignment_conditions_text_to_image_on_regressed_embeddings(tiny_checkpoint):
    import numpy as np

    from emu_edge.runtime.prompt import emu2_builder
    from emu_edge.training import generate
    from emu_edge.training.tokenizer import encode_text_fn
    from emu_edge.training.train import STAGES, StageLoss, make_batch

    model, tokenizer, cfg = load_checkpoint(tiny_checkpoint)
    builder = emu2_builder(model.token_ids, encode_text_fn(tokenizer), cfg.n_query, cfg.frame_n_query)
    step = int(np.random.default_rng().integers(1000))
    [(images, noise, timesteps, drop, prompts)], counts = make_batch(cfg, "5", step, 0, 1, builder, 0, model)
    assert any(prompts) and not all(prompts)  # a mixture: some text-to-image, some autoencoding
    with torch.no_grad():
        got, _ = StageLoss(model, STAGES["5"], builder)((images, noise, timesteps, drop, prompts), counts)
        cond = model.encoder(images, cfg.n_query)
        for i, prompt in enumerate(prompts):
            if prompt is not None:
                cond[i] = generate.regress(model, builder, "text_to_image", [("text", prompt)])
        want = model.diffusion_loss(images, cond, noise, timesteps, drop)
        plain = model.diffusion_loss(images, model.encoder(images, cfg.n_query), noise, timesteps, drop)
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got, plain)  # the regressed condition is not the encoder's


def test_stage_0_labels_each_embedding_with_the_object_under_it():
    import numpy as np

    from emu_edge import data
    from emu_edge.training.batching import ATTRIBUTE_CLASSES, attribute_targets

    names = ATTRIBUTE_CLASSES
    rng = np.random.default_rng()
    for s in data.captioning("train", 40, seed=int(rng.integers(1000)), size=32):
        t = attribute_targets(s, 64).numpy()
        objects = s.meta["scene"].objects
        labelled = {(names["colour"][c], names["shape"][sh], names["size"][sz]) for c, sh, sz in t if c}
        assert labelled == {(o.colour, o.shape, o.size) for o in objects}
        # Background cells are labelled "none" and lie away from every object's centre.
        grid = t[:, 0].reshape(8, 8)
        for o in objects:
            assert grid[int(o.y * 8), int(o.x * 8)] != 0
        if len(objects) == 2:  # the left object's cells are left of the right one's
            cols = [np.nonzero(t[:, 1].reshape(8, 8) == names["shape"].index(o.shape))[1] for o in objects]
            if objects[0].shape != objects[1].shape:
                assert cols[0].mean() < cols[1].mean()
    digit = data.digits("train", 1, size=32)[0]
    t = attribute_targets(digit, 64).numpy()
    ink = t[:, 1] != 0
    assert 8 <= ink.sum() < 64
    assert {names["shape"][i] for i in t[ink, 1]} == {data.DIGIT_WORDS[digit.meta["digit"]]}
    assert (t[ink, 2] == -100).all() and (t[ink, 0] == names["colour"].index("white")).all()
