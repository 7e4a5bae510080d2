"""emu_edge.data: determinism, split hygiene, grammar round-trips and task consistency."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import emu_edge.data as d
from emu_edge.cli import main as cli_main
from emu_edge.data import grammar
from emu_edge.data.scenes import EXTENT

IMAGE_KINDS = ("image", "target_image")


def _arrays(sample):
    return [s.value for s in sample.segments if s.kind in IMAGE_KINDS + ("frames",)]


def _texts(sample):
    return [s.value for s in sample.segments if s.kind in ("text", "answer")]


def _mask(image):
    return image.astype(np.int32).sum(-1) > 60


@pytest.mark.parametrize("task", list(d.TASKS))
def test_samples_are_well_formed_and_deterministic(task):
    one = d.TASKS[task]
    for split in d.SPLITS:
        batch = getattr(d, task)(split, 6, seed=3, size=32)
        assert len(batch) == 6
        for k, sample in enumerate(batch):
            assert isinstance(sample, d.Sample) and sample.task == task
            assert sample.meta["split"] == split and sample.meta["index"] == k
            assert sample.segments[-1].kind in ("answer", "target_image")
            for seg in sample.segments:
                assert seg.kind in d.SEGMENT_KINDS
                if seg.kind in IMAGE_KINDS:
                    assert seg.value.dtype == np.uint8 and seg.value.shape == (32, 32, 3)
                elif seg.kind == "frames":
                    assert seg.value.dtype == np.uint8 and seg.value.shape == (d.N_FRAMES, 32, 32, 3)
                else:
                    assert isinstance(seg.value, str) and seg.value == seg.value.strip() and seg.value
                    assert "[" not in seg.value  # no chat-template tokens in the data
            # sample k does not depend on n: the one-form and a fresh call agree
            again = one(split, k, seed=3, size=32)
            assert _texts(again) == _texts(sample)
            for a, b in zip(_arrays(again), _arrays(sample)):
                np.testing.assert_array_equal(a, b)
    # a different seed gives a different stream
    assert [_texts(s) for s in getattr(d, task)("train", 8, seed=0)] != \
        [_texts(s) for s in getattr(d, task)("train", 8, seed=1)]


def test_other_image_sizes():
    s = d.captioning_one("val", 0, size=64)
    assert s.segments[0].value.shape == (64, 64, 3)
    assert d.video_one("val", 0, size=48).segments[0].value.shape == (8, 48, 48, 3)


def test_render_sizes_colours_and_background():
    for shape in d.SHAPES:
        for colour, rgb in d.COLOURS.items():
            small = d.render(d.Scene((d.Obj(shape, colour, "small", 0.5, 0.5),)))
            large = d.render(d.Scene((d.Obj(shape, colour, "large", 0.5, 0.5),)))
            assert (small[0, 0] == 0).all() and (large[0, 0] == 0).all()  # black background
            cols = np.nonzero(_mask(small).any(0))[0]
            width = (cols.max() - cols.min() + 1) / 32
            assert 0.2 <= width <= 0.33, (shape, width)
            cols = np.nonzero(_mask(large).any(0))[0]
            assert 0.4 <= (cols.max() - cols.min() + 1) / 32 <= 0.56
            # the object's centre pixel is its colour
            np.testing.assert_allclose(small[16, 16], rgb, atol=2)
    # distinct colours stay distinct
    rgbs = np.array(list(d.COLOURS.values()), dtype=float)
    dist = np.linalg.norm(rgbs[:, None] - rgbs[None], axis=-1) + np.eye(len(rgbs)) * 1e3
    assert dist.min() > 80


def test_objects_stay_inside_and_two_object_scenes_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = d.random_scene(rng, 2)
        left, right = scene.objects
        n = len(scene.objects)
        assert left.x + EXTENT[n][left.size] / 2 < 0.5 < right.x - EXTENT[n][right.size] / 2
        for o in scene.objects:
            half = EXTENT[n][o.size] / 2
            assert half <= o.x <= 1 - half and half <= o.y <= 1 - half
        image = d.render(scene)
        # nothing drawn on the image border
        assert not _mask(image)[[0, -1]].any() and not _mask(image)[:, [0, -1]].any()


def test_split_disjointness():
    seen = {split: set() for split in d.SPLITS}
    for split in d.SPLITS:
        n = 2000 if split == "train" else 500
        for k in range(n):
            for task in ("captioning", "vqa", "text_to_image", "chat"):
                sample = d.TASKS[task](split, k)
                assert d.scene_split(sample.meta["scene"]) == split
                seen[split].add(sample.meta["scene"])
            sub = d.subject_one(split, k)
            seen[split].update([sub.meta["source_scene"], sub.meta["scene"]])
    assert not seen["test"] & seen["train"]
    assert not seen["val"] & seen["train"]
    assert not seen["test"] & seen["val"]
    # the split test is not vacuous: scenes repeat within a split
    assert len(seen["train"]) > 1000


def test_caption_parse_round_trip():
    rng = np.random.default_rng(1)
    for k in range(400):
        scene = d.random_scene(rng, 1 + k % 2)
        want = [o.attributes for o in scene.objects]
        assert d.parse_caption(d.caption(scene)) == want
        assert d.parse_caption(d.caption(scene, with_size=False)) == [(None, c, s) for _, c, s in want]
    assert d.caption(d.Scene((d.Obj("circle", "red", "large", 0.5, 0.5),))) == "a large red circle"
    two = d.Scene((d.Obj("circle", "red", "small", 0.2, 0.5), d.Obj("square", "blue", "large", 0.8, 0.5)))
    assert d.caption(two) == "a small red circle left of a large blue square"
    assert d.caption(two, with_size=False) == "a red circle left of a blue square"
    assert d.parse_caption("  A Red Circle. ") == [(None, "red", "circle")]
    for bad in ("", "a red", "red circle", "a huge red circle", "a red circle left of", "a red circle and a blue square",
                "a red circle left of a blue square left of a green diamond", "a handwritten digit seven"):
        assert d.parse_caption(bad) is None, bad


def _quadrant(o):
    return ("top " if o.y < 0.5 else "bottom ") + ("left" if o.x < 0.5 else "right")


def test_vqa_answers_match_the_scene():
    qtypes = set()
    for k in range(600):
        sample = d.vqa_one("train", k)
        scene, objs = sample.meta["scene"], sample.meta["scene"].objects
        question, answer = sample.segments[1].value, sample.answer
        qtypes.add(sample.meta["question_type"])
        if m := re.fullmatch(r"what colour is the (\w+)\?", question):
            hits = [o for o in objs if o.shape == m[1]]
            assert len(hits) == 1 and answer == hits[0].colour
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", question):
            hits = [o for o in objs if o.colour == m[1]]
            assert len(hits) == 1 and answer == hits[0].shape
        elif m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
            hits = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
            assert len(hits) == 1 and answer == hits[0].size
        elif question == "how many shapes are there?":
            assert answer == ("one" if len(objs) == 1 else "two")
        elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
            hits = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
            assert len(hits) == 1
            if len(objs) == 2:
                assert answer == ("left" if hits[0] is objs[0] else "right")
            else:
                assert answer == _quadrant(hits[0])
                assert abs(hits[0].x - 0.5) >= 0.1 and abs(hits[0].y - 0.5) >= 0.1
        else:
            pytest.fail(f"unexpected question {question!r}")
        assert 1 <= len(answer.split()) <= 2
        # the image shows the scene
        np.testing.assert_array_equal(sample.segments[0].value, d.render(scene))
    assert qtypes == {"colour", "shape", "size", "count", "position"}


def test_questions_skip_ambiguous_ones():
    twins = d.Scene((d.Obj("circle", "red", "small", 0.25, 0.5), d.Obj("circle", "red", "large", 0.75, 0.5)))
    pool = d.questions(twins)
    assert set(pool) == {"count"}  # neither colour, shape, size nor position singles out one object
    centred = d.Scene((d.Obj("square", "blue", "large", 0.5, 0.45),))
    assert "position" not in d.questions(centred)


def test_captioning_and_text_to_image_mix():
    caps = d.captioning("train", 400)
    two = sum(len(s.meta["scene"].objects) == 2 for s in caps) / len(caps)
    assert 0.3 < two < 0.5
    for s in caps:
        assert s.answer == d.caption(s.meta["scene"])
        np.testing.assert_array_equal(s.segments[0].value, d.render(s.meta["scene"]))
    t2i = d.text_to_image("train", 400)
    assert 0.1 < sum(len(s.meta["scene"].objects) == 2 for s in t2i) / 400 < 0.3
    short = sum(not s.meta["with_size"] for s in t2i) / 400
    assert 0.4 < short < 0.6
    for s in t2i:
        parsed = d.parse_caption(s.segments[0].value)
        assert [(c, sh) for _, c, sh in parsed] == [(o.colour, o.shape) for o in s.meta["scene"].objects]
        np.testing.assert_array_equal(s.segments[1].value, d.render(s.meta["scene"]))
        if len(s.meta["scene"].objects) == 1:
            assert (s.meta["colour"], s.meta["shape"]) == parsed[0][1:]


def test_subject_changes_only_the_instructed_attribute():
    changes = set()
    for k in range(300):
        s = d.subject_one("train", k)
        src, tgt = s.meta["source_scene"].objects[0], s.meta["scene"].objects[0]
        diff = {f for f in ("shape", "colour", "size", "x", "y") if getattr(src, f) != getattr(tgt, f)}
        assert diff == {s.meta["change"]}
        changes.add(s.meta["change"])
        instruction = s.segments[1].value
        assert instruction in {"make it " + tgt.colour, "as a " + tgt.shape, "make it " + tgt.size}
        assert instruction in grammar.corpus()
        source_img, target_img = s.segments[0].value, s.segments[2].value
        np.testing.assert_array_equal(source_img, d.render(s.meta["source_scene"]))
        np.testing.assert_array_equal(target_img, d.render(s.meta["scene"]))
        assert not np.array_equal(source_img, target_img)
        # the object stays where it was: the drawn centroids agree within a pixel
        for img, o in ((source_img, src), (target_img, tgt)):
            rows, cols = np.nonzero(_mask(img))
            assert abs(cols.mean() - o.x * 32 + 0.5) < 1.5
        assert abs(np.nonzero(_mask(source_img))[1].mean() - np.nonzero(_mask(target_img))[1].mean()) < 1.5
    assert changes == {"colour", "shape", "size"}


def test_video_motion_matches_caption():
    directions = set()
    for k in range(120):
        s = d.video_one("train", k)
        frames = s.segments[0].value
        m = re.fullmatch(r"a (\w+) (\w+) moving (left|right|up|down)", s.answer)
        assert m and m[1] in d.COLOURS and m[2] in d.SHAPES
        directions.add(m[3])
        centroids = []
        for frame in frames:
            rows, cols = np.nonzero(_mask(frame))
            assert len(rows) > 10  # the object is in every frame
            centroids.append((cols.mean(), rows.mean()))
        dx, dy = np.subtract(centroids[-1], centroids[0])
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[m[3]]
        moved = np.array([dx, dy])
        assert np.dot(moved, expected) >= 6  # at least 6 px along the stated direction
        assert abs(np.dot(moved, expected[::-1])) < 0.5  # and none across it
        # the colour of the moving object is the named one
        np.testing.assert_allclose(frames[0][int(round(centroids[0][1])), int(round(centroids[0][0]))],
                                   d.COLOURS[m[1]], atol=3)
    assert directions == {"left", "right", "up", "down"}


def test_fewshot_pattern_is_consistent():
    patterns = set()
    for k in range(200):
        s = d.fewshot_one("val", k)
        kinds = [seg.kind for seg in s.segments]
        n = s.meta["n_shots"]
        assert 2 <= n <= 4 and kinds == ["image", "text"] * n + ["image", "answer"]
        pattern = s.meta["pattern"]
        patterns.add(pattern)
        scenes = s.meta["shot_scenes"] + [s.meta["scene"]]
        answers = [seg.value for seg in s.segments if seg.kind in ("text", "answer")]
        for scene, answer, image in zip(scenes, answers, [seg.value for seg in s.segments if seg.kind == "image"]):
            o = scene.objects[0]
            assert answer == {"colour": o.colour, "shape": o.shape, "colour shape": f"{o.colour} {o.shape}"}[pattern]
            np.testing.assert_array_equal(image, d.render(scene))
    assert patterns == set(d.FEWSHOT_PATTERNS)


def test_chat_turns():
    for k in range(200):
        s = d.chat_one("test", k)
        kinds = [seg.kind for seg in s.segments]
        assert kinds[0] == "image" and kinds[1:] in (["text", "answer"] * 2, ["text", "answer"] * 3)
        questions = [seg.value for seg in s.segments if seg.kind == "text"]
        assert len(set(questions)) == len(questions)
        valid = {q: a for pairs in d.questions(s.meta["scene"]).values() for q, a in pairs}
        valid["what is in the image?"] = d.caption(s.meta["scene"])
        answers = [seg.value for seg in s.segments if seg.kind == "answer"]
        for q, a in zip(questions, answers):
            assert valid[q] == a


def test_digits_extract_and_splits():
    images, labels = d.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert sorted(np.unique(labels)) == list(range(10))
    parts = {split: set(d.digit_split_indices(split).tolist()) for split in d.SPLITS}
    assert [len(parts[s]) for s in d.SPLITS] == [1437, 179, 181]
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["val"] and not parts["val"] & parts["test"]
    assert set().union(*parts.values()) == set(range(1797))
    for split in d.SPLITS:
        for s in d.digits(split, 50):
            assert s.meta["digit_index"] in parts[split]
            assert s.answer == "a handwritten digit " + d.DIGIT_WORDS[s.meta["digit"]]
            assert s.meta["digit"] == labels[s.meta["digit_index"]]
    img = d.digit_image(5, size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.max() > 200
    # the upscaled image downsamples back close to the 8x8 original
    small = img[..., 0].reshape(8, 4, 8, 4).mean((1, 3)) / 255 * 16
    assert np.abs(small - images[5]).mean() < 1.5


def test_mixture_follows_weights_and_is_deterministic():
    weights = {"captioning": 3, "vqa": 1, "digits": 0}
    tasks = [d.mixture(weights, "train", k).task for k in range(400)]
    assert "digits" not in tasks
    assert 0.65 < tasks.count("captioning") / 400 < 0.85
    assert tasks == [d.mixture(dict(reversed(list(weights.items()))), "train", k).task for k in range(400)]
    s = d.mixture(weights, "train", 7)
    assert _texts(s) == _texts(d.TASKS[s.task]("train", 7))
    with pytest.raises(ValueError, match="unknown task"):
        d.mixture({"captionning": 1}, "train", 0)
    with pytest.raises(ValueError, match="unknown split"):
        d.captioning_one("training", 0)


def _words(text):
    return text.replace("?", " ").split()


def test_corpus_covers_every_sample():
    corpus = d.corpus()
    vocabulary = {w for line in corpus for w in _words(line)}
    sentences = set(corpus)
    for k in range(2000):
        sample = d.mixture({t: 1 for t in d.TASKS}, "train", k)
        for text in _texts(sample):
            assert text in sentences, text
            assert set(_words(text)) <= vocabulary
    assert len(corpus) == len(set(corpus))


def test_cli_writes_folder(tmp_path, capsys):
    out = tmp_path / "data"
    code = cli_main(["data", "--split", "val", "--n", "17", "--out", str(out), "--seed", "2"])
    assert code == 0
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(records) == 17 and len({r["id"] for r in records}) == 17
    assert {r["task"] for r in records} == set(d.TASKS)
    for r in records:
        for key in ("id", "task", "image", "prompt", "answer"):
            assert key in r
        for path in [r["image"], r["target_image"], r.get("frames")] + [s["image"] for s in r.get("shots", [])]:
            if path is not None:
                assert (out / path).is_file()
        assert r["image"] is not None or r["task"] == "text_to_image"
    assert (out / "README.txt").is_file()
    t2i = next(r for r in records if r["task"] == "text_to_image")
    assert t2i["target_image"] and d.parse_caption(t2i["prompt"])

    code = cli_main(["data", "--split", "test", "--n", "4", "--out", str(out / "b"), "--tasks", "vqa,digits"])
    assert code == 0 and {json.loads(l)["task"] for l in (out / "b" / "prompts.jsonl").read_text().splitlines()} \
        == {"vqa", "digits"}
    for bad, message in ((["--split", "dev"], "train, val, test"), (["--n", "0"], ">= 1"),
                         (["--tasks", "captioning,nope"], "captioning")):
        args = {"--split": "val", "--n": "2", "--out": str(tmp_path / "x")}
        args.update(dict(zip(bad[::2], bad[1::2])))
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli_main(["data"] + [x for kv in args.items() for x in kv])


def test_import_does_not_need_torch():
    code = ("import sys; sys.modules['torch'] = None; import emu_edge.data as d; "
            "d.mixture({t: 1 for t in d.TASKS}, 'train', 0); import emu_edge.data.cli; "
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)
