"""OpenAI request bodies -> the jobs the engine runs, checked in full before any is queued.

Every rule a request can break is a RequestError with the HTTP status and OpenAI's error
shape, raised here in the HTTP process: a bad request never reaches the inference worker
(where, in a batch, it would take its neighbours down with it).

    chat:   messages (system, user, assistant; text and image_url parts: data URLs only),
            max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream
    images: prompt, n, size "WxH", response_format b64_json; seed, guidance, steps as
            extra fields; edits add the uploaded images (subject-driven)
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from emu_edge.runtime.images import load_image


class RequestError(Exception):
    """A request the server refuses: status (4xx) and a message for the client."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 504: "timeout_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for (the server's command line sets them)."""

    max_images: int = 4                # images in one chat request (or edit)
    max_image_pixels: int = 4096 * 4096
    max_n: int = 4                     # images one generation request asks for
    max_stop: int = 4                  # stop strings, as OpenAI's API allows
    timeout: float = 120.0             # seconds from arrival until the request answers 504


@dataclass
class TextJob:
    turns: list                        # [(items, answer or None)], the last one unanswered
    system: str | None = None
    max_tokens: int | None = None      # None: the bundle's default, capped to the context
    stop: list[str] | None = None
    sampling: dict = field(default_factory=dict)   # SamplingConfig fields; {} is greedy
    stream: bool = False
    deadline: float = math.inf         # time.monotonic() (one clock for every process)


@dataclass
class ImageJob:
    prompt: str
    images: list = field(default_factory=list)     # subject images (edits)
    n: int = 1
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    steps: int | None = None
    seed: int = 0
    deadline: float = math.inf


@dataclass
class Cancel:
    """Queued after a job whose client has gone: the engine drops the job."""


def check_model(body: dict, model_ids: list[str]) -> None:
    model = body.get("model")
    if model is not None and model not in model_ids:
        raise RequestError(404, f"the model {model!r} does not exist here; this server serves "
                                f"{', '.join(repr(m) for m in model_ids)}", "model", "model_not_found")


def parse_chat(body, limits: Limits, model_ids: list[str]) -> TextJob:
    body = _object(body)
    check_model(body, model_ids)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    system = None
    turns: list = []
    images = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise RequestError(400, f"{where}: a system message comes first, once", where)
            system = _text_only(message.get("content"), where)
        elif role == "user":
            items = _user_items(message.get("content"), where, limits)
            images += sum(not isinstance(item, str) for item in items)
            if images > limits.max_images:
                raise RequestError(400, f"too many images: at most {limits.max_images} per request", where)
            if turns and turns[-1][1] is None:   # consecutive user messages: one turn
                turns[-1] = (turns[-1][0] + items, None)
            else:
                turns.append((items, None))
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise RequestError(400, f"{where}: an assistant message answers a user message", where)
            turns[-1] = (turns[-1][0], _text_only(message.get("content"), where))
        else:
            raise RequestError(400, f"{where}: role must be system, user or assistant, got {role!r}", where)
    if not turns or turns[-1][1] is not None:
        raise RequestError(400, "the last message must be the user's (the one to answer)", "messages")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1: one answer per request (send several requests; they are batched)",
                           "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, "max_tokens", 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > limits.max_stop):
        raise RequestError(400, f"stop must be a non-empty string or a list of at most {limits.max_stop}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "stream")
    return TextJob(turns=turns, system=system, max_tokens=max_tokens, stop=stop or None,
                   sampling=_sampling(body), stream=stream, deadline=time.monotonic() + limits.timeout)


def parse_image_generation(body, limits: Limits, model_ids: list[str], images=()) -> ImageJob:
    body = _object(body)
    check_model(body, model_ids)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "prompt must be a non-empty string", "prompt")
    n = _integer(body.get("n", 1), "n", 1)
    if n > limits.max_n:
        raise RequestError(400, f"n must be at most {limits.max_n}", "n")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise RequestError(400, "response_format must be b64_json: images come back in the response (a device "
                                "has no public address to link to)", "response_format")
    width = height = None
    size = body.get("size")
    if size not in (None, "auto"):
        parts = size.split("x") if isinstance(size, str) else []
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise RequestError(400, f"size must be WIDTHxHEIGHT in pixels (e.g. 64x64), got {size!r}", "size")
        width, height = int(parts[0]), int(parts[1])
    guidance = body.get("guidance")
    if guidance is not None:
        guidance = _number(guidance, "guidance", 0.0, 100.0)
    steps = body.get("steps")
    if steps is not None:
        steps = _integer(steps, "steps", 1, 1000)
    seed = 0 if body.get("seed") is None else _integer(body["seed"], "seed", 0)
    if len(images) > limits.max_images:
        raise RequestError(400, f"too many images: at most {limits.max_images} per request", "image")
    return ImageJob(prompt=prompt, images=list(images), n=n, width=width, height=height, guidance=guidance,
                    steps=steps, seed=seed, deadline=time.monotonic() + limits.timeout)


def decode_image(data: bytes, where: str, limits: Limits) -> Image.Image:
    """Image file bytes -> RGB, refusing what is not an image or has too many pixels
    before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise RequestError(400, f"{where}: a {image.width}x{image.height} image is over the limit of "
                                        f"{limits.max_image_pixels} pixels", where)
            image.load()
            return load_image(image)
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, EOFError, ValueError) as e:
        raise RequestError(400, f"{where} is not an image that can be read (PNG, JPEG, ...): {e}", where) from e


# ---------------------------------------------------------------------------------------


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _text_only(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where}: content must be a string or text parts", where)


def _user_items(content, where: str, limits: Limits) -> list:
    if isinstance(content, str):
        if not content.strip():
            raise RequestError(400, f"{where}: empty message", where)
        return [content]
    if not isinstance(content, list) or not content:
        raise RequestError(400, f"{where}: content must be a string or a non-empty list of parts", where)
    items = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            items.append(_data_url_image(url, at, limits))
        else:
            raise RequestError(400, f"{at}: a part is {{type: text, text}} or {{type: image_url, image_url: "
                                    "{url}}}", at)
    return items


def _data_url_image(url, where: str, limits: Limits) -> Image.Image:
    if not isinstance(url, str):
        raise RequestError(400, f"{where}: image_url.url must be a string", where)
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only data URLs (data:image/png;base64,...) are accepted; this server "
                                "does not fetch remote addresses", where)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise RequestError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: the data URL's base64 is invalid: {e}", where) from e
    return decode_image(data, where, limits)


def _sampling(body: dict) -> dict:
    """OpenAI's sampling fields -> SamplingConfig's. Neither temperature nor top_p: the
    bundle's text defaults (greedy); temperature 0 is greedy too."""
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    if temperature is not None:
        temperature = _number(temperature, "temperature", 0.0, 2.0)
    if top_p is not None:
        top_p = _number(top_p, "top_p", 0.0, 1.0)
        if top_p == 0:
            raise RequestError(400, "top_p must be in (0, 1]", "top_p")
    if seed is not None:
        seed = _integer(seed, "seed", 0)
    if (temperature is None and top_p is None) or temperature == 0:
        return {}
    return {"do_sample": True, "temperature": 1.0 if temperature is None else temperature,
            "top_p": 1.0 if top_p is None else top_p, "seed": seed}


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(400, f"{name} must be an integer {bound}, got {value!r}", name)
    return value
