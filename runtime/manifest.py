"""manifest.json: the one contract between the exporter and the runtime.

The exporter writes the manifest through these classes and the runtime reads it through
them, so the two sides cannot drift. Keys this version does not know are kept and written
back unchanged (a newer exporter's additions survive a round trip through an older tool);
a schema version this runtime does not read is refused with the versions it does read.

Schema 2 declares the model's family (`model.family`: llm, emu2, emu3) instead of
leaving the runtime to guess it from which graphs exist; each graph says its role, the
tensor names the runtime binds for that role, and the precisions it may be turned into;
the prompt layout is data (runtime.prompt.PromptLayout); family fields live in one object
named after the family (`model.emu2`).

Schema 3: the decoder takes token ids (`input_ids`, and for emu2 `image_embeds`) with the
embedding table inside it, so there is no embed graph; a schema 2 bundle (embed.onnx in
front of a decoder that took `inputs_embeds`) is refused with a request to re-export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu_edge.runtime.prompt import PromptLayout, PromptLayoutError

SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = (3,)
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
ATTENTION_VARIANTS = ("gqa", "standard")


class ManifestError(ValueError):
    """manifest.json is unreadable, of an unsupported schema version, or incomplete."""


def _unknown_field():
    return field(default_factory=dict, repr=False, compare=False)


class _Spec:
    """from_dict/to_dict for the dataclasses below: required fields are those without a
    default; unknown keys go to `unknown_keys` and come back out on to_dict."""

    _nested: dict[str, Any] = {}
    # Integer fields that must be >= 1 (every integer in a manifest is >= 0).
    _positive: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, where: str):
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "unknown_keys"]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ManifestError(f"{where} is missing the field(s) {', '.join(missing)}")
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None}
        values = {}
        for name in names:
            if name in data:
                convert = cls._nested.get(name)
                if convert is None or (data[name] is None and name in optional):
                    values[name] = data[name]
                else:
                    values[name] = convert(data[name], f"{where}.{name}")
        cls._check_types(values, where)
        spec = cls(**values)
        spec.unknown_keys = {k: v for k, v in data.items() if k not in names}
        spec.validate(where)
        return spec

    @classmethod
    def _check_types(cls, values: dict, where: str) -> None:
        """Each value against its field's annotation, so a wrong type is reported here with
        its key, not as a TypeError wherever the runtime first uses it."""
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if not _matches(value, hints[f.name]):
                expected = str(f.type)
                if "int" in expected:
                    expected += " (integers >= 0; true/false is not an integer)"
                raise ManifestError(f"{where}.{f.name} must be {expected}, got {_show(value)}")
            if f.name in cls._positive and value is not None and value < 1:
                raise ManifestError(f"{where}.{f.name} must be >= 1, got {value}")

    def validate(self, where: str) -> None:
        pass

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "unknown_keys":
                continue
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        out.update(self.unknown_keys)
        return out


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value, hint) -> bool:
    """Whether a value read from JSON has the type a field is annotated with. bool is not an
    int here (JSON `true` would otherwise pass as 1), an int passes for a float, and no
    count, size, id or version in a manifest is negative."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if (origin or hint) is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value if args)
    if (origin or hint) is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items() if args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is None and isinstance(hint, type):
        return isinstance(value, hint)  # str, a nested spec
    return True  # an annotation this check does not read (a tuple, ...) is left to validate()


def _show(value, kind: bool = True) -> str:
    """A value as the manifest spells it, shortened, and its JSON type."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text[:60] + "..." if len(text) > 60 else text
    if not kind:
        return text
    name = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{text} ({name})"


def _plain(value):
    if isinstance(value, (_Spec, PromptLayout)):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _list_of(cls):
    def convert(data, where):
        if not isinstance(data, list):
            raise ManifestError(f"{where} must be a JSON list, got {type(data).__name__}")
        return [cls.from_dict(item, f"{where}[{i}]") for i, item in enumerate(data)]
    return convert


def _dict_of(cls):
    def convert(data, where):
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be a JSON object, got {type(data).__name__}")
        return {k: cls.from_dict(v, f"{where}.{k}") for k, v in data.items()}
    return convert


def _dynamic_axes(data, where):
    # JSON object keys are strings; axes are ints in memory.
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be a JSON object")
    try:
        return {name: {int(axis): dim for axis, dim in axes.items()} for name, axes in data.items()}
    except (AttributeError, ValueError) as e:
        raise ManifestError(f"{where} must map tensor names to {{axis: dim name}}: {e}") from e


@dataclass
class IOSpec(_Spec):
    """One graph input or output. Symbolic dims are strings ("batch", "sequence")."""

    name: str
    dtype: str          # numpy name: "float32", "int64", ...
    shape: list         # ints and dim names
    unknown_keys: dict = _unknown_field()


@dataclass
class GraphSpec(_Spec):
    role: str                      # embed, decoder, vision_encoder, unet, judge (emu3: vq_encoder, vq_decoder)
    file: str
    sha256: str
    precision: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    ir_version: int
    opset: int                     # of the default ONNX domain
    domains: dict[str, int]        # every operator domain the graph uses -> its version
    min_onnxruntime: str
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # TensorRT-style shape profiles: {input: {"min": [...], "opt": [...], "max": [...]}}
    profiles: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # Tensors stored beside the graph (graphs over 2 GB): [{"file": ..., "sha256": ...}]
    external_data: list[dict] = field(default_factory=list)
    # What the runtime binds, by what it means: {"logits": "logits", "past_key":
    # "past_key_values.{layer}.key", ...}; per-layer names carry a {layer} field.
    names: dict[str, str] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])   # what quantize may make of it
    extra: dict = field(default_factory=dict)
    unknown_keys: dict = _unknown_field()

    _nested = {"inputs": _list_of(IOSpec), "outputs": _list_of(IOSpec), "dynamic_axes": _dynamic_axes}

    def validate(self, where: str) -> None:
        for value, key in [(self.precision, "precision")] + [(p, "precisions") for p in self.precisions]:
            if value not in PRECISIONS:
                raise ManifestError(f"{where}.{key} holds {value!r}; expected one of {', '.join(PRECISIONS)}")
        for i, entry in enumerate(self.external_data):
            if not (isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)):
                raise ManifestError(f'{where}.external_data[{i}] must be {{"file": name, "sha256": hex digest}}, '
                                    f"got {_show(entry)}")

    def name(self, key: str, layer: int | None = None) -> str:
        """The tensor bound for `key` ("logits", "past_key" with a layer, ...)."""
        if key not in self.names:
            raise ManifestError(f"the {self.role} graph {self.file} declares no tensor for {key!r} "
                                f"(it maps {', '.join(self.names) or 'nothing'}); re-export the bundle")
        return self.names[key].format(layer=layer) if layer is not None else self.names[key]

    def has(self, key: str) -> bool:
        return key in self.names

    def input(self, name: str) -> IOSpec | None:
        return next((io for io in self.inputs if io.name == name), None)

    def output(self, name: str) -> IOSpec | None:
        return next((io for io in self.outputs if io.name == name), None)


@dataclass
class KVSpec(_Spec):
    """The decoder's cache: per layer, key and value buffers
    [batch, num_kv_heads, max_length, head_dim] of `dtype`, past and present shared."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    attention: str = "standard"    # which decoder graph variant was exported
    unknown_keys: dict = _unknown_field()

    _positive = ("num_layers", "num_kv_heads", "head_dim")

    def validate(self, where: str) -> None:
        if self.attention not in ATTENTION_VARIANTS:
            raise ManifestError(f"{where}.attention is {self.attention!r}; expected one of {', '.join(ATTENTION_VARIANTS)}")

    def bytes_for(self, batch: int, max_length: int) -> int:
        import numpy as np
        itemsize = np.dtype(self.dtype).itemsize
        return 2 * self.num_layers * batch * self.num_kv_heads * max_length * self.head_dim * itemsize


@dataclass
class Emu2Spec(_Spec):
    """An Emu2-style model's visual side: continuous embeddings in, regressed embeddings
    and a diffusion U-Net out."""

    n_query: int                   # visual embeddings per image
    frame_n_query: int             # visual embeddings per video frame
    visual_dim: int
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    video_frames: int = 8          # frames a clip is sampled to
    unconditional_embedding: dict = field(default_factory=lambda: {"kind": "zeros"})
    scheduler: dict = field(default_factory=dict)   # a diffusers scheduler config
    unknown_keys: dict = _unknown_field()

    def counts(self) -> dict[str, int]:
        """The repeat counts the prompt layout refers to by name."""
        return {"n_query": self.n_query, "frame_n_query": self.frame_n_query}


@dataclass
class Emu3Spec(_Spec):
    """An Emu3-style model's visual side: an image is h x w VQ codes, written into the one
    vocabulary as visual token ids, each row followed by EOL:

        BOI "{h}*{w}" IMAGE_WRAPPER (h rows of w visual ids, EOL) EOF EOI

    Code c is token id `visual_token_start + c` (0 <= c < codebook_size). Every id here is
    the tokenizer's own (tokenizer.json's added tokens), never a constant of ours."""

    visual_token_start: int        # id of <|visual token 000000|>
    eol_token_id: int              # <|extra_200|>: ends each row of codes
    eof_token_id: int              # <|extra_201|>: ends the codes
    boi_token_id: int              # <|image start|>
    eoi_token_id: int              # <|image end|>
    image_wrapper_token_id: int    # <|image token|>: between "{h}*{w}" and the codes
    spatial_factor: int            # pixels per code along each side (the VQ-VAE's)
    temporal_factor: int           # frames per temporal code (an image is repeated this often)
    codebook_size: int             # = the number of visual tokens
    # The image processor (Emu3ImageProcessor): pixels are resized so that both sides are
    # multiples of resize_factor and their product lies in [min_pixels, max_pixels], the
    # aspect ratio kept (transformers' smart_resize), then x * rescale_factor, then
    # (x - mean) / std per channel.
    resize_factor: int
    min_pixels: int
    max_pixels: int
    resample: str                  # PIL filter name
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    image_area: int                # pixels of a generated image (Emu3Processor's image_area)
    image_token_id: int | None = None   # <image>: the processor's placeholder, if the tokenizer has it
    unknown_keys: dict = _unknown_field()

    _positive = ("spatial_factor", "temporal_factor", "codebook_size", "resize_factor", "min_pixels", "max_pixels",
                 "image_area")

    def validate(self, where: str) -> None:
        if self.resize_factor % self.spatial_factor:
            raise ManifestError(f"{where}.resize_factor {self.resize_factor} is not a multiple of the spatial "
                                f"factor {self.spatial_factor}: resized images would not be whole codes")
        if self.min_pixels > self.max_pixels:
            raise ManifestError(f"{where}.min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                raise ManifestError(f"{where}.{key} must hold 3 values (RGB), got {getattr(self, key)}")

    def visual_ids(self) -> range:
        return range(self.visual_token_start, self.visual_token_start + self.codebook_size)


# family -> the ModelSpec field holding its own settings (None: the text fields suffice).
# A new family adds its spec class and one entry here.
FAMILY_FIELDS: dict[str, str | None] = {"llm": None, "emu2": "emu2", "emu3": "emu3"}


def _prompt_layout(data, where):
    try:
        return PromptLayout.from_dict(data)
    except PromptLayoutError as e:
        raise ManifestError(f"{where}: {e}") from e


@dataclass
class ModelSpec(_Spec):
    """What the runtime needs to know about the model besides the graphs: the text fields
    every family has, the prompt layout, and the family's own object."""

    family: str                    # llm | emu2 | emu3 (FAMILY_FIELDS)
    vocab_size: int
    hidden_size: int
    max_length: int                # positions the decoder's rotary tables cover
    kv: KVSpec
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    prompt: PromptLayout | None = None            # None: prompts are plain tokenizer text (llm)
    generation: dict = field(default_factory=dict)  # generation defaults
    architecture: str | None = None
    source: dict = field(default_factory=dict)    # where the weights came from
    emu2: Emu2Spec | None = None
    emu3: Emu3Spec | None = None
    unknown_keys: dict = _unknown_field()

    _nested = {"kv": KVSpec.from_dict, "prompt": _prompt_layout, "emu2": Emu2Spec.from_dict,
               "emu3": Emu3Spec.from_dict}
    _positive = ("vocab_size", "hidden_size", "max_length")

    def validate(self, where: str) -> None:
        if self.family not in FAMILY_FIELDS:
            raise ManifestError(f"{where}.family is {self.family!r}; this runtime runs "
                                f"{', '.join(FAMILY_FIELDS)}. Upgrade emu-edge to run it.")
        own = FAMILY_FIELDS[self.family]
        if own is not None and getattr(self, own) is None:
            raise ManifestError(f"{where} is of family {self.family!r} but has no {where}.{own} object")

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def special_ids(self) -> set[int]:
        """Every id that is not text: the layout's special tokens, EOS, BOS and padding."""
        ids = set(self.prompt.tokens.values()) if self.prompt else set()
        ids |= set(self.eos_ids()) | {self.bos_token_id, self.pad_token_id}
        return ids - {None}


@dataclass
class Manifest(_Spec):
    schema_version: int
    graphs: dict[str, GraphSpec]
    model: ModelSpec
    tokenizer: str = "tokenizer.json"
    unknown_keys: dict = _unknown_field()

    _nested = {"graphs": _dict_of(GraphSpec), "model": ModelSpec.from_dict}

    def role(self, role: str) -> GraphSpec:
        """The graph that plays `role` (embed, decoder, ...)."""
        return self.graphs[self.graph_name(role)]

    def graph_name(self, role: str) -> str:
        for name, graph in self.graphs.items():
            if graph.role == role:
                return name
        raise ManifestError(f"the bundle has no {role} graph (its graphs: "
                            f"{', '.join(f'{n} ({g.role})' for n, g in self.graphs.items())})")

    def has_role(self, role: str) -> bool:
        return any(g.role == role for g in self.graphs.values())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        # The version is checked before anything else: a newer schema may have moved the
        # very fields whose absence would otherwise be reported.
        if isinstance(data, dict) and "schema_version" in data:
            version = data["schema_version"]
            if not _matches(version, int) or version not in SUPPORTED_SCHEMA_VERSIONS:
                readable = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
                if _matches(version, int) and version < SCHEMA_VERSION:
                    raise ManifestError(
                        f"{where} has schema_version {version!r}, written by an older emu-edge; this runtime "
                        f"reads schema version(s) {readable}. Re-export the bundle with this version "
                        "(emu-edge export CHECKPOINT --out BUNDLE, or emu-edge export-hf for Hugging Face "
                        "folders); the shipped model's cached bundle is re-exported on its own.")
                raise ManifestError(
                    f"{where} has schema_version {_show(version, kind=False)}; this runtime reads schema version(s) "
                    f"{readable}. Upgrade emu-edge to read it, or re-export the bundle with this version.")
        return super().from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path} does not exist; a bundle folder holds a {MANIFEST_FILE}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ManifestError(f"cannot read {path}: {e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); the bundle is corrupt, re-export it") from e
        return cls.from_dict(data, str(path))
