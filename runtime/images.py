"""Images in and out of the runtime: loading, model preprocessing, video frames, outputs.

Every input goes through `load_image`, which returns an 8-bit RGB `PIL.Image`:

- Accepted: a `PIL.Image.Image`, a path (`str` or `pathlib.Path`) to any file PIL can
  read, or a numpy array of shape [H, W], [H, W, 1] (grey), [H, W, 3] (RGB) or
  [H, W, 4] (RGBA), with dtype uint8 (0..255) or float (0..1; values outside [0, 1] or NaN
  are an error, so mis-scaled data is caught rather than clipped).
- EXIF orientation is applied first, so a photo comes out the way viewers show it.
- Transparency (RGBA, LA, La, RGBa, PA, and P/L/RGB images with a transparent colour) is
  composited over black, because the training images have black backgrounds.
- 16-bit and 32-bit integer greys (I;16, I;16B, I;16L, I) are read as 0..65535 and scaled
  to 0..255 (divided by 257, rounded; values outside 0..65535 in mode I are clipped).
- Float greys (mode F) follow the float-array rule: values must lie in [0, 1].
- Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) uses PIL's own conversion
  to RGB (CMYK is PIL's plain, uncalibrated conversion).
- PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is kept: a file over twice the
  limit is refused with an error naming the file, its size and the limit.
- An image with a zero side (0 x N) is refused: there is nothing to look at.

`preprocess` resizes each image to a `size` x `size` square with PIL's bicubic filter,
the whole image squeezed or stretched (no crop, so nothing at the edges is lost; the
training images are square so nothing is distorted in practice). Images already at that
size are not resampled.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_WIDE_INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ARRAY_RULE = (
    "accepted arrays are [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last), "
    "dtype uint8 (0..255) or float (0..1)"
)


def load_image(item) -> Image.Image:
    """Any accepted image input -> 8-bit RGB `PIL.Image` (rules in the module docstring)."""
    if isinstance(item, Image.Image):
        return _to_rgb(_not_empty(item, "the image"))
    if isinstance(item, (str, Path)):
        return _load_path(Path(item))
    if isinstance(item, np.ndarray):
        return _from_array(item)
    raise TypeError(
        f"cannot read an image from {type(item).__name__}; pass a PIL image, a path or a "
        f"numpy array ({_ARRAY_RULE})"
    )


def _load_path(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of an image file")
    try:
        with Image.open(path) as image:
            _not_empty(image, str(path))
            image.load()
            return _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image PIL can read") from error
    except (OSError, SyntaxError, EOFError) as error:
        # truncated or corrupt data surfaces while decoding, after the header was accepted
        raise ValueError(f"{path} could not be decoded as an image: {error}") from error


def _not_empty(image: Image.Image, what: str) -> Image.Image:
    if 0 in image.size:
        raise ValueError(f"{what} is {image.width}x{image.height} pixels: an image needs at least one pixel "
                         "in each direction")
    return image


def _too_large(path: Path, error: Image.DecompressionBombError) -> Image.DecompressionBombError:
    """PIL's bomb error with the file, its size and the limit. PIL's message has only the
    pixel count; the size is the argument of the check that raised it."""
    size = next((frame.f_locals.get("size") for frame, _ in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_name == "_decompression_bomb_check"), None)
    what = f"{size[0]}x{size[1]} pixels" if isinstance(size, tuple) and len(size) == 2 else str(error)
    return Image.DecompressionBombError(
        f"{path} is too large to open safely ({what}); the limit is PIL's Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS} pixels (files up to twice that open with a warning). Raise it only for "
        "files you trust")


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _WIDE_INT_MODES:
        wide = np.asarray(image).astype(np.float64)
        return _grey_to_rgb(np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(image), "mode F image"))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_black(image.convert("RGBA"))
    if mode != "RGB":
        return image.convert("RGB")
    return image  # exif_transpose already returned a copy


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey).convert("RGB")


def _over_black(rgba: Image.Image) -> Image.Image:
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _float_to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    if np.isnan(values).any():
        raise ValueError(f"{what} holds NaN; fix the data upstream (floats must lie in [0, 1])")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"{what} holds floats outside [0, 1] (min {values.min():.4g}, max "
            f"{values.max():.4g}); scale it to [0, 1], or pass uint8 0..255"
        )
    return np.round(values.astype(np.float64) * 255).astype(np.uint8)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ValueError(f"image array is empty (shape {array.shape}); {_ARRAY_RULE}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"image array has shape {array.shape}; {_ARRAY_RULE}")
    if np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array, "image array")
    elif array.dtype != np.uint8:
        raise ValueError(f"image array has dtype {array.dtype}; {_ARRAY_RULE}")
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        return _grey_to_rgb(array)
    if array.shape[2] == 4:
        return _over_black(Image.fromarray(array))
    return Image.fromarray(array)


def preprocess(images: list, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """Images -> float32 pixel values [N, 3, size, size], normalised as (x / 255 - mean) / std.

    Each item is anything `load_image` accepts. Resizing is bicubic to a full square (see
    the module docstring); an image already `size` x `size` is used as is.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    if mean_arr.shape != (3,) or std_arr.shape != (3,):
        raise ValueError(f"mean and std need one value per RGB channel, got {mean!r} and {std!r}")
    if not (std_arr > 0).all():
        raise ValueError(f"std values must be > 0, got {std!r}")
    if isinstance(images, (Image.Image, np.ndarray, str, Path)):
        raise ValueError("preprocess takes a list of images; wrap a single image in a list")
    if len(images) == 0:
        raise ValueError("preprocess got an empty list of images")
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, item in enumerate(images):
        image = load_image(item)
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
        out[i] = ((pixels - mean_arr) / std_arr).transpose(2, 0, 1)
    return out


def frame_indices(num_frames: int, k: int) -> np.ndarray:
    """k indices spread evenly over 0..num_frames-1, first and last frame included.

    Computed as np.linspace(0, num_frames - 1, k).round() (numpy rounds halves to even).
    A clip shorter than k repeats frames in order, e.g. 3 frames, k=8 -> 0 0 1 1 1 1 2 2.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k (frames to sample) must be a positive integer, got {k!r}")
    if num_frames <= 0:
        raise ValueError("the clip has no frames")
    return np.linspace(0, num_frames - 1, k).round().astype(np.int64)


def sample_frames(frames, k: int) -> list[Image.Image]:
    """k RGB frames sampled uniformly from a clip (see `frame_indices` for the rule).

    `frames` is a list of images (anything `load_image` accepts), a numpy array
    [T, H, W, 3] (or [T, H, W] / [T, H, W, 1] / [T, H, W, 4]), or a path to an animated
    image file such as a GIF. Only the chosen frames are converted.
    """
    if isinstance(frames, (str, Path)):
        return _sample_animation(Path(frames), k)
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise ValueError(
                f"a clip array must be [T, H, W, 3] (or [T, H, W]), got shape {frames.shape}"
            )
    elif not isinstance(frames, (list, tuple)):
        raise TypeError(
            f"cannot read a clip from {type(frames).__name__}; pass a list of images, a "
            "numpy array [T, H, W, 3] or a path to an animated GIF"
        )
    return [load_image(frames[int(i)]) for i in frame_indices(len(frames), k)]


def _sample_animation(path: Path, k: int) -> list[Image.Image]:
    if not path.is_file():
        raise FileNotFoundError(f"clip file not found: {path}")
    try:
        with Image.open(path) as animation:
            indices = frame_indices(getattr(animation, "n_frames", 1), k)
            chosen = {}
            for i, frame in enumerate(ImageSequence.Iterator(animation)):
                if i in indices:
                    chosen[i] = _to_rgb(frame)
                if i >= indices[-1]:
                    break
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image PIL can read") from error
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"{path} could not be decoded as an animation: {error}") from error
    return [chosen[int(i)].copy() for i in indices]


def check_output_path(path: str | Path, mkdir: bool = False) -> Path:
    """Refuse an image path that cannot be written, before any work goes into the image:
    a suffix PIL cannot write, a folder, or a missing or read-only parent folder (made
    only when mkdir=True)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the image file to write, e.g. {path / 'image.png'}")
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        what = f"PIL cannot write {path.suffix} images" if path.suffix else "no suffix tells the image format"
        raise ValueError(f"{path}: {what}; name the file .png (or .jpg, .webp, .bmp, .tif)")
    folder = path.parent
    if not folder.is_dir():
        if not mkdir:
            raise ValueError(f"cannot write {path}: its folder {folder} does not exist; create it, or pass --mkdir")
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: its folder {folder} is not writable; choose another output path")
    return path


def to_pil(
    array: np.ndarray,
    value_range: tuple[float, float] | None = None,
    channels_first: bool | None = None,
) -> Image.Image:
    """One generated image as an RGB `PIL.Image`.

    array: [3, H, W] or [H, W, 3]. uint8 is taken as 0..255. Floats need `value_range`,
    (-1, 1) for raw diffusion output or (0, 1); values are mapped to [0, 1], clipped
    (samplers overshoot a little), then scaled to 0..255 and rounded, as diffusers does.
    The layout is read from where the size-3 axis is; pass `channels_first` when both end
    axes are 3.
    """
    array = np.asarray(array)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[2]):
        raise ValueError(f"to_pil takes one image [3, H, W] or [H, W, 3], got shape {array.shape}")
    if channels_first is None:
        if array.shape[0] == 3 and array.shape[2] == 3:
            raise ValueError(f"shape {array.shape} is ambiguous; pass channels_first=True or False")
        channels_first = array.shape[0] == 3
    if channels_first:
        array = array.transpose(1, 2, 0)
    if array.shape[2] != 3:
        raise ValueError(
            f"expected 3 channels, got shape {array.shape} (channels_first={channels_first})"
        )
    if array.dtype == np.uint8:
        if value_range not in (None, (0, 255)):
            raise ValueError(f"uint8 arrays are 0..255; value_range {value_range!r} does not apply")
        return Image.fromarray(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"to_pil takes uint8 or float arrays, got dtype {array.dtype}")
    if value_range is None:
        raise ValueError("float arrays need value_range: (-1, 1) for diffusion output, or (0, 1)")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    unit = np.clip((array.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    return Image.fromarray(np.round(unit * 255).astype(np.uint8))
