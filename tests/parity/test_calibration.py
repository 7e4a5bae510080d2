"""emu-edge calibrate: what is recorded, that it replays to what the runtime computed, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emu_edge.calibration.calibrate import CalibrateSettings, Calibration, calibrate
from emu_edge.calibration.data import CalibrationDataError, read_requests
from emu_edge.cli import main


@pytest.fixture(scope="session")
def calib_data(tmp_path_factory):
    """18 validation samples (two of each task) at the tiny model's 16 px, via the CLI."""
    out = tmp_path_factory.mktemp("calib_data")
    assert main(["data", "--split", "val", "--n", "18", "--size", "16", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def calib(tiny_bundle, calib_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib"
    assert main(["calibrate", str(tiny_bundle), "--data", str(calib_data), "--out", str(out),
                 "--max-new-tokens", "6", "--steps", "3", "--threads", "1"]) == 0
    return out


def test_every_graph_is_recorded_in_every_phase(calib):
    c = Calibration.load(calib)
    assert set(c.graphs) == {"decoder", "vision_encoder", "unet"}
    phases = {m["phase"] for m in c.meta("decoder")}
    assert phases == {"prefill", "decode"}
    # Decode steps come from text answers and from regressing image embeddings.
    assert {m["task"] for m in c.meta("decoder") if m["phase"] == "decode"} >= {"captioning", "text_to_image"}
    unet = c.samples("unet")
    timesteps = {m["timestep"] for m in c.meta("unet")}
    assert len(timesteps) == 3, "every denoising step is recorded"
    for feeds in unet:
        # cond and uncond in one call: 2 rows, the second conditioned on zeros
        assert feeds["sample"].shape[0] == 2
        assert np.abs(feeds["encoder_hidden_states"][0]).sum() > 0
        assert not feeds["encoder_hidden_states"][1].any()
    # The last requests are held out, and no request is on both sides.
    held = {m["request"] for m in c.meta("decoder") if m["heldout"]}
    kept = {m["request"] for m in c.meta("decoder") if not m["heldout"]}
    assert held and kept and max(kept) < min(held)


def test_recorded_decode_steps_replay_to_the_runtime_logits(calib, tiny_bundle, calib_data):
    """A recorded decoder call, run alone through onnxruntime (KV padded back from its
    stored prefix), gives the logits the pipeline computed at that step."""
    import onnxruntime as ort

    from emu_edge.runtime.pipeline import Pipeline

    c = Calibration.load(calib)
    pipe = Pipeline.load(tiny_bundle, threads=1)
    request = read_requests(calib_data, 16)[0]          # captioning: [image] -> text
    encoded = pipe.encode_items(request.items, "text")
    session = pipe.session(1)
    out = session.prefill([encoded.ids], pipe.encode_visuals(encoded.visuals))
    logits = [out.logits]
    for _ in range(5):
        out = session.step(out.logits.argmax(-1))
        logits.append(out.logits)
    recorded = [(m, f) for m, f in zip(c.meta("decoder"), c.samples("decoder")) if m["request"] == 0]
    assert [m["phase"] for m, _ in recorded] == ["prefill"] + ["decode"] * 5
    graph = ort.InferenceSession(str(pipe.bundle.graph_path("decoder")), providers=["CPUExecutionProvider"])
    for step, (meta, feeds) in enumerate(recorded):
        assert feeds["past_key_values.0.key"].shape[2] == meta["kv_length"] == pipe.max_length
        got = graph.run(["logits"], feeds)[0]
        np.testing.assert_allclose(got, logits[step], rtol=1e-4, atol=1e-4)


def test_empty_calibration_set_is_refused(tiny_bundle, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("\n")
    with pytest.raises(CalibrationDataError, match="empty"):
        calibrate(tiny_bundle, tmp_path, tmp_path / "out")
    assert main(["calibrate", str(tiny_bundle), "--data", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out")]) == 1
    assert "emu-edge data" in capsys.readouterr().err


def test_images_of_the_wrong_shape_are_refused(tiny_bundle, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "--split", "val", "--n", "2", "--size", "24", "--out", str(data)]) == 0
    assert main(["calibrate", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "24x24" in err and "16x16" in err and "--size 16" in err


def test_calibration_recorded_elsewhere_is_refused(calib, tiny_checkpoint, tmp_path):
    """Samples recorded on another graph, or of another shape, do not calibrate this one."""
    from emu_edge.runtime.bundle import Bundle

    other = tmp_path / "standard"
    assert main(["export", str(tiny_checkpoint), "--out", str(other), "--attention", "standard"]) == 0
    c = Calibration.load(calib)
    with pytest.raises(CalibrationDataError, match="different decoder graph"):
        c.check(Bundle.open(other).manifest, ["decoder"])
    c.check(Bundle.open(other).manifest, ["unet"])      # the same U-Net export: usable
    index = json.loads((calib / "calibration.json").read_text())
    index["graphs"]["unet"]["inputs"] = ["sample", "timestep"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "calibration.json").write_text(json.dumps(index))
    with pytest.raises(CalibrationDataError, match="inputs"):
        Calibration.load(broken).check(Bundle.open(other).manifest, ["unet"])


def test_settings_are_checked(tiny_bundle, calib_data, tmp_path):
    with pytest.raises(ValueError, match="heldout"):
        calibrate(tiny_bundle, calib_data, tmp_path / "c", CalibrateSettings(heldout=1.5))
    with pytest.raises(CalibrationDataError, match="not a calibration folder"):
        Calibration.load(tmp_path)


def test_text_only_bundle_calibrates_on_its_own_tokens(llm_folders, calib_data, tmp_path):
    """The tiny HF tokenizer knows none of the caption words: rather than recording the
    unknown token's embedding over and over, calibration prompts with random ordinary ids."""
    bundle = tmp_path / "text"
    assert main(["export-hf", "--llm", str(llm_folders("gqa")), "--out", str(bundle)]) == 0
    out = calibrate(bundle, calib_data, tmp_path / "calib", CalibrateSettings(max_new_tokens=3), log=lambda *a: None)
    c = Calibration.load(out)
    assert c.graphs == ["decoder"]
    assert "random token ids" in c.index["text_prompts"]
    prefills = [f for m, f in zip(c.meta("decoder"), c.samples("decoder")) if m["phase"] == "prefill"]
    assert len(prefills) == 18
    row = prefills[0]["input_ids"][0]
    assert len(set(row.tolist())) == len(row), "every prompt position is a different token"
