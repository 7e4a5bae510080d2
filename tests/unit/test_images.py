"""Image loading rules, preprocessing, frame sampling and output conversion."""

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from emu_edge.runtime.images import frame_indices, load_image, preprocess, sample_frames, to_pil

H, W = 5, 7


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def rgb_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def grey_expected(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.int64)[..., None], 3, axis=-1)


def over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.round(colour.astype(np.float64) * alpha[..., None] / 255)


def save_and_load(image: Image.Image, tmp_path, suffix: str) -> tuple[Image.Image, Image.Image]:
    """Loads the image both from memory and from a file written in tmp_path."""
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode, "the file format changed the mode under test"
    return load_image(image), load_image(path)


def _palette_image(seed: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    indices = rng(seed).integers(0, 6, size=(H, W), dtype=np.uint8)
    palette = rng(seed + 1).integers(0, 256, size=(6, 3), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    return image, indices, palette


def test_mode_p(tmp_path):
    image, indices, palette = _palette_image(0)
    for loaded in save_and_load(image, tmp_path, ".png"):
        np.testing.assert_array_equal(rgb_of(loaded), palette[indices])


def test_mode_p_with_transparent_index_goes_black(tmp_path):
    image, indices, palette = _palette_image(2)
    image.info["transparency"] = 3
    path = tmp_path / "transparent.png"
    image.save(path, transparency=3)
    expected = palette[indices].astype(np.int64)
    expected[indices == 3] = 0
    assert (indices == 3).any()
    for loaded in (load_image(image), load_image(path)):
        np.testing.assert_array_equal(rgb_of(loaded), expected)


def test_mode_l(tmp_path):
    grey = rng(3).integers(0, 256, size=(H, W), dtype=np.uint8)
    for loaded in save_and_load(Image.fromarray(grey), tmp_path, ".png"):
        np.testing.assert_array_equal(rgb_of(loaded), grey_expected(grey))


def test_mode_la_composited_over_black(tmp_path):
    la = rng(4).integers(0, 256, size=(H, W, 2), dtype=np.uint8)
    expected = over_black(grey_expected(la[..., 0]), la[..., 1])
    for loaded in save_and_load(Image.fromarray(la, mode="LA"), tmp_path, ".png"):
        np.testing.assert_allclose(rgb_of(loaded), expected, atol=1)


def test_mode_rgba_composited_over_black(tmp_path):
    rgba = rng(5).integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    expected = over_black(rgba[..., :3], rgba[..., 3])
    for loaded in save_and_load(Image.fromarray(rgba), tmp_path, ".png"):
        pixels = rgb_of(loaded)
        np.testing.assert_allclose(pixels, expected, atol=1)
        np.testing.assert_array_equal(pixels[0, 0], 0)
        np.testing.assert_array_equal(pixels[0, 1], rgba[0, 1, :3])


def test_mode_cmyk(tmp_path):
    cmyk = rng(6).integers(0, 256, size=(H, W, 4), dtype=np.uint8).astype(np.float64)
    # PIL's plain conversion: each channel (255 - ink) scaled by (255 - black) / 255
    expected = np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)
    image = Image.fromarray(cmyk.astype(np.uint8), mode="CMYK")
    for loaded in save_and_load(image, tmp_path, ".tiff"):
        np.testing.assert_allclose(rgb_of(loaded), expected, atol=1)


def test_mode_i16_scaled(tmp_path):
    wide = rng(7).integers(0, 65536, size=(H, W)).astype(np.uint16)
    wide[0, :2] = (0, 65535)
    expected = grey_expected(np.round(wide / 257))
    for loaded in save_and_load(Image.fromarray(wide), tmp_path, ".png"):
        np.testing.assert_array_equal(rgb_of(loaded), expected)
        np.testing.assert_array_equal(rgb_of(loaded)[0, :2, 0], (0, 255))


def test_mode_i_clipped_to_16_bit():
    wide = np.array([[-5, 0, 257 * 100, 70000]], dtype=np.int32)
    image = Image.fromarray(wide)
    assert image.mode == "I"
    np.testing.assert_array_equal(rgb_of(load_image(image))[0, :, 0], (0, 0, 100, 255))


def test_mode_f(tmp_path):
    values = rng(8).random((H, W)).astype(np.float32)
    for loaded in save_and_load(Image.fromarray(values), tmp_path, ".tiff"):
        expected = grey_expected(np.round(values.astype(np.float64) * 255))
        np.testing.assert_array_equal(rgb_of(loaded), expected)


def test_mode_f_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        load_image(Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)))


def test_mode_1(tmp_path):
    bits = rng(9).random((H, W)) > 0.5
    for loaded in save_and_load(Image.fromarray(bits), tmp_path, ".png"):
        np.testing.assert_array_equal(rgb_of(loaded), grey_expected(bits * 255))


def test_exif_orientation_is_applied(tmp_path):
    pixels = rng(10).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    np.testing.assert_array_equal(rgb_of(load_image(path)), np.rot90(pixels, k=-1))


@pytest.mark.parametrize("shape", [(H, W), (H, W, 1), (H, W, 3), (H, W, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_numpy_arrays(shape, dtype):
    raw = rng(11).integers(0, 256, size=shape).astype(np.uint8)
    array = raw if dtype == np.uint8 else (raw / 255).astype(dtype)
    if len(shape) == 2 or shape[-1] == 1:
        expected = grey_expected(raw.reshape(H, W))
    elif shape[-1] == 3:
        expected = raw.astype(np.int64)
    else:
        expected = over_black(raw[..., :3], raw[..., 3])
    np.testing.assert_allclose(rgb_of(load_image(array)), expected, atol=1 if shape[-1] == 4 else 0)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (np.zeros((3, H, W), dtype=np.uint8), "channels last"),
        (np.zeros((2, H, W, 3), dtype=np.uint8), "channels last"),
        (np.zeros((H, W, 3), dtype=np.int16), "dtype int16"),
        (np.full((H, W, 3), 1.5, dtype=np.float32), r"outside \[0, 1\]"),
        (np.full((H, W), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_arrays_say_what_is_accepted(array, match):
    with pytest.raises(ValueError, match=match):
        load_image(array)


def test_unsupported_type():
    with pytest.raises(TypeError, match="PIL image, a path or a numpy array"):
        load_image(b"not an image")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is plain text, not pixels\n")
    with pytest.raises(ValueError, match="notes.png is not an image PIL can read"):
        load_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(rng(12).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png could not be decoded"):
        load_image(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        load_image(tmp_path)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (16, 16)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > twice the limit
    with pytest.raises(Image.DecompressionBombError, match=r"bomb.png.*MAX_IMAGE_PIXELS = 100"):
        load_image(path)
    with pytest.raises(Image.DecompressionBombError, match="bomb.png"):
        sample_frames(path, 4)


def test_preprocess_matches_direct_computation():
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    at_size = rng(13).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    wide = rng(14).integers(0, 256, size=(10, 30, 3), dtype=np.uint8)
    out = preprocess([at_size, Image.fromarray(wide)], 16, mean, std)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32

    def normalise(pixels):
        return ((pixels / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)

    # at the target size the pixels are not resampled
    np.testing.assert_allclose(out[0], normalise(at_size.astype(np.float64)), rtol=1e-5, atol=1e-5)
    squeezed = Image.fromarray(wide).resize((16, 16), Image.Resampling.BICUBIC)
    squeezed = np.asarray(squeezed, dtype=np.float64)
    np.testing.assert_allclose(out[1], normalise(squeezed), rtol=1e-5, atol=1e-5)


def test_preprocess_constant_image_stays_constant():
    out = preprocess([np.full((9, 13, 3), (10, 120, 250), dtype=np.uint8)], 8, [0.5] * 3, [0.5] * 3)
    expected = (np.array([10, 120, 250]) / 255 - 0.5) / 0.5
    expected = np.broadcast_to(expected[:, None, None], (3, 8, 8))
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 0}, "size"),
        ({"mean": [0.5, 0.5]}, "mean and std"),
        ({"std": [0.5, 0.0, 0.5]}, "std values must be > 0"),
        ({"images": []}, "empty list"),
        ({"images": np.zeros((4, 4, 3), dtype=np.uint8)}, "list of images"),
    ],
)
def test_preprocess_validation(kwargs, match):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    args = {"images": [image], "size": 4, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match=match):
        preprocess(**{**args, **kwargs})


def test_frame_indices():
    np.testing.assert_array_equal(frame_indices(8, 8), np.arange(8))
    np.testing.assert_array_equal(frame_indices(3, 8), [0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(frame_indices(1, 4), [0, 0, 0, 0])
    for total in (5, 16, 31, 100):
        for k in (8, 12, 16):
            indices = frame_indices(total, k)
            np.testing.assert_array_equal(indices, np.linspace(0, total - 1, k).round())
            assert indices[0] == 0 and indices[-1] == total - 1 and (np.diff(indices) >= 0).all()
    with pytest.raises(ValueError, match="k"):
        frame_indices(10, 0)
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(0, 8)


def _clip(total: int) -> np.ndarray:
    # frame t is filled with grey level 10 * t, so a frame's value names its index
    return np.stack([np.full((6, 6, 3), 10 * t, dtype=np.uint8) for t in range(total)])


def _frame_ids(frames) -> list[int]:
    assert all(f.mode == "RGB" for f in frames)
    return [int(np.asarray(f)[0, 0, 0]) // 10 for f in frames]


@pytest.mark.parametrize("total, k", [(20, 8), (24, 12), (5, 16)])
def test_sample_frames_from_array_and_list(total, k):
    clip = _clip(total)
    expected = frame_indices(total, k).tolist()
    assert _frame_ids(sample_frames(clip, k)) == expected
    assert _frame_ids(sample_frames([Image.fromarray(f) for f in clip], k)) == expected


def test_sample_frames_from_gif(tmp_path):
    clip = _clip(20)
    path = tmp_path / "clip.gif"
    frames = [Image.fromarray(f[..., 0]) for f in clip]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    sampled = sample_frames(path, 8)
    assert len(sampled) == 8 and sampled[0].size == (6, 6)
    assert _frame_ids(sampled) == frame_indices(20, 8).tolist()
    assert _frame_ids(sample_frames(str(path), 30)) == frame_indices(20, 30).tolist()


def test_sample_frames_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gif"):
        sample_frames(tmp_path / "missing.gif", 8)
    with pytest.raises(ValueError, match="no frames"):
        sample_frames([], 8)
    with pytest.raises(TypeError, match="list of images"):
        sample_frames(42, 8)


def test_to_pil_matches_diffusers_postprocess():
    sample = torch.from_numpy((rng(15).standard_normal((3, 12, 10)) * 0.7).astype(np.float32))
    theirs = VaeImageProcessor().postprocess(sample[None], output_type="pil")[0]
    theirs = np.asarray(theirs).astype(np.int64)
    ours = rgb_of(to_pil(sample.numpy(), value_range=(-1, 1)))
    assert ours.shape == (12, 10, 3)
    assert np.abs(ours - theirs).max() <= 1  # float rounding at exact .5 steps only
    assert (ours == theirs).mean() > 0.99


def test_to_pil_layouts_and_ranges():
    unit = rng(16).random((8, 6, 3))
    expected = np.round(unit * 255)
    np.testing.assert_array_equal(rgb_of(to_pil(unit, value_range=(0, 1))), expected)
    channels_first = unit.transpose(2, 0, 1)
    np.testing.assert_array_equal(rgb_of(to_pil(channels_first, value_range=(0, 1))), expected)
    as_uint8 = expected.astype(np.uint8)
    np.testing.assert_array_equal(rgb_of(to_pil(as_uint8)), expected)
    clipped = rgb_of(to_pil(np.full((4, 4, 3), 1.3), value_range=(-1, 1)))
    assert (clipped == 255).all()


@pytest.mark.parametrize(
    "array, kwargs, match",
    [
        (np.zeros((4, 4, 3)), {}, "need value_range"),
        (np.zeros((4, 4, 3), dtype=np.uint8), {"value_range": (-1, 1)}, "uint8 arrays are 0..255"),
        (np.zeros((3, 4, 3)), {"value_range": (0, 1)}, "ambiguous"),
        (np.zeros((4, 4, 4)), {"value_range": (0, 1)}, r"\[3, H, W\] or \[H, W, 3\]"),
        (np.zeros((4, 4, 3)), {"value_range": (1, 0)}, "high > low"),
    ],
)
def test_to_pil_errors(array, kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_pil(array, **kwargs)
