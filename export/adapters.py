"""Per-architecture adapters: a Hugging Face folder -> the canonical decoder.

Each adapter says where a source layout keeps its text settings (config.json itself, or a
sub-config) and its decoder weights (Llama's names under a prefix), and which settings it
fixes. `ADAPTERS` maps config.json's `architectures` entry to one; adding an architecture
with a Llama-shaped block is one entry here.

    LlamaForCausalLM              model.*, lm_head.weight
    Qwen2ForCausalLM              the same, with q/k/v biases; sliding-window attention refused
    Emu3ForConditionalGeneration  text_model.model.*, text_model.lm_head.weight (vqmodel.* is
                                  the VQ-VAE's), settings under "text_config", rope theta 1e6

Weights are read one tensor at a time (safetensors `safe_open`), as the builder asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from emu_edge.export.decoder import DecoderDescription, DecoderExportError

_BLOCK_ELEMENTS = 16 * 1024**2   # values converted to float32 at a time (64 MB)

# canonical name -> Llama's (per-layer ones after "model.layers.{i}.")
_LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LLAMA_LAYER = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{k}": f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")},
    **{f"mlp.{p}.{k}": f"mlp.{p}_proj.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")},
}


def describe_config(c, **fixed) -> DecoderDescription:
    """A transformers text config (Llama-like attribute names) -> the description;
    `fixed` sets what the architecture decides rather than its config."""
    heads = c.num_attention_heads
    rope = getattr(c, "rope_parameters", None)
    if rope is None:   # configs before transformers 5: rope_theta and rope_scaling
        rope = dict(getattr(c, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope_theta = float(rope.pop("rope_theta", 10000.0))
    attention_bias = bool(getattr(c, "attention_bias", False))
    settings = dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size, rms_norm_eps=float(c.rms_norm_eps), activation=getattr(c, "hidden_act", "silu"),
        rope_type=rope_type, rope_theta=rope_theta, rope_scaling=rope, qkv_bias=attention_bias,
        o_bias=attention_bias, mlp_bias=bool(getattr(c, "mlp_bias", False)),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(c, "max_position_embeddings", None))
    return DecoderDescription(**{**settings, **fixed})


def _no_sliding_window(c) -> None:
    layer_types = getattr(c, "layer_types", None) or []
    if getattr(c, "use_sliding_window", False) and "sliding_attention" in layer_types:
        raise DecoderExportError(
            f"this config uses sliding-window attention (sliding_window {c.sliding_window} on layers "
            f"{[i for i, t in enumerate(layer_types) if t == 'sliding_attention']}), which the decoder graph "
            "does not implement; only full attention exports (use_sliding_window: false)")


@dataclass(frozen=True)
class DecoderAdapter:
    config_class: str                  # the transformers class that reads the text settings
    prefix: str = ""                   # where Llama's weight names start in the folder
    text_config: str | None = None     # config.json key of the text settings, if nested
    family: str = "llm"                # the bundle family a folder of this kind exports to
    fixed: dict = field(default_factory=dict)
    check: Callable | None = None

    def config(self, config_json: dict):
        """The transformers config object of the text model (its defaults filled in)."""
        import transformers

        settings = config_json.get(self.text_config) or {} if self.text_config else config_json
        return getattr(transformers, self.config_class).from_dict(settings)

    def describe(self, config) -> DecoderDescription:
        if self.check is not None:
            self.check(config)
        return describe_config(config, **self.fixed)

    def weight_names(self, num_layers: int) -> dict[str, str]:
        """canonical name -> the folder's name, for every tensor the builder may read."""
        names = {k: self.prefix + v for k, v in _LLAMA_TOP.items()}
        for i in range(num_layers):
            names.update({f"layers.{i}.{k}": f"{self.prefix}model.layers.{i}.{v}" for k, v in _LLAMA_LAYER.items()})
        return names


ADAPTERS: dict[str, DecoderAdapter] = {
    "LlamaForCausalLM": DecoderAdapter("LlamaConfig"),
    "Qwen2ForCausalLM": DecoderAdapter("Qwen2Config", fixed=dict(qkv_bias=True, o_bias=False, mlp_bias=False),
                                       check=_no_sliding_window),
    "Emu3ForConditionalGeneration": DecoderAdapter("Emu3TextConfig", prefix="text_model.", text_config="text_config",
                                                   family="emu3"),
}


class UnsupportedArchitecture(DecoderExportError):
    pass


def adapter_for(architectures: list[str] | None, where: str = "config.json") -> tuple[str, DecoderAdapter]:
    for name in architectures or []:
        if name in ADAPTERS:
            return name, ADAPTERS[name]
    raise UnsupportedArchitecture(f"{where} declares architectures {architectures or 'none'}; "
                                  f"supported: {', '.join(ADAPTERS)}")


class CanonicalWeights:
    """canonical name -> float32 array, read from `source` (name -> array, with `in`)."""

    def __init__(self, source, names: dict[str, str]):
        self.source, self.names = source, names

    def __contains__(self, name: str) -> bool:
        return name in self.names and self.names[name] in self.source

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self:
            raise KeyError(name)
        return np.asarray(self.source[self.names[name]], dtype=np.float32)


class SafetensorsFolder:
    """The tensors of a save_pretrained folder (one file or an index of shards), by name,
    each read on access."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no *.safetensors weights (save the model with save_pretrained)")
        self.where: dict[str, Path] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.where.update((k, path) for k in f.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{path} is not a readable safetensors file: {e}") from e

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as float32, converted a block of rows at a time, the file opened per
        block: safetensors maps the file, and the pages a read touches stay in memory until
        it is closed, so a bfloat16 table is never held in both dtypes (for Emu3-8B's
        lm_head, 1.5 GB more)."""
        from safetensors import safe_open

        path = str(self.where[name])
        with safe_open(path, framework="pt") as f:   # torch reads bfloat16, numpy cannot
            shape = f.get_slice(name).get_shape()
            if not shape:
                return f.get_tensor(name).float().numpy()
        out = np.empty(shape, np.float32)
        rows = max(1, _BLOCK_ELEMENTS * shape[0] // max(out.size, 1))
        for start in range(0, shape[0], rows):
            with safe_open(path, framework="pt") as f:
                out[start:start + rows] = f.get_slice(name)[start:start + rows].float().numpy()
        return out


@dataclass
class DecoderSource:
    """What the decoder and embed graphs are built from."""

    architecture: str
    adapter: DecoderAdapter
    config: object                   # the transformers text config
    description: DecoderDescription
    weights: CanonicalWeights


def open_folder(folder: str | Path, config_json: dict) -> DecoderSource:
    folder = Path(folder)
    architecture, adapter = adapter_for(config_json.get("architectures"), str(folder / "config.json"))
    try:
        config = adapter.config(config_json)
    except Exception as e:  # transformers raises several types for bad values
        raise DecoderExportError(f"{folder / 'config.json'} is not a valid {architecture} config: {e}") from e
    desc = adapter.describe(config)
    weights = CanonicalWeights(SafetensorsFolder(folder), adapter.weight_names(desc.num_layers))
    return DecoderSource(architecture, adapter, config, desc, weights)


def from_model(model) -> DecoderSource:
    """An in-memory transformers model (tests, training) -> its decoder source."""
    architecture, adapter = adapter_for([type(model).__name__], type(model).__name__)
    config = getattr(model.config, adapter.text_config) if adapter.text_config else model.config
    desc = adapter.describe(config)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    # In memory, Emu3 keeps its text model under model.text_model (save_pretrained renames it).
    if adapter.prefix and not any(k.startswith(adapter.prefix) for k in state):
        state = {_saved_name(k): v for k, v in state.items()}
    return DecoderSource(architecture, adapter, config, desc,
                         CanonicalWeights(state, adapter.weight_names(desc.num_layers)))


def _saved_name(name: str) -> str:
    if name.startswith("model.text_model."):
        return "text_model.model." + name[len("model.text_model."):]
    return "text_model." + name if name == "lm_head.weight" else name
