"""`emu-edge export-hf`: Hugging Face folders -> a bundle.

    emu-edge export-hf DIR [--vision DIR] [--unet DIR] --out BUNDLE
                       [--attention auto|gqa|standard] [--max-length N] [--max-image HxW]
    (--llm DIR is the older spelling of DIR)

DIR is a transformers folder (config.json, *.safetensors, tokenizer.json) whose
`architectures` export/adapters.py knows; its adapter's family picks the recipe
(export/specs.py, one spec per graph):

    LlamaForCausalLM, Qwen2ForCausalLM   llm: decoder.onnx; with --vision and
                                         --unet, an emu2 bundle
    Emu3ForConditionalGeneration         emu3: decoder (the text model), vq_encoder,
                                         vq_decoder; the image settings from the folder's
                                         own files (export/emu3_folder.py); max_length by
                                         default room for the largest image it generates

Decoder weights are read per tensor with safetensors; the model class is never
instantiated (Emu3's VQ-VAE is: the tracer needs its modules).
"""

from __future__ import annotations

import json
from pathlib import Path

from emu_edge.export.adapters import ADAPTERS, DecoderSource, open_folder
from emu_edge.export.bundle_writer import BundleWriter
from emu_edge.export.emu3_folder import ImageRoom, emu3_chat_layout, parse_image_size, read_emu3_folder
from emu_edge.export.specs import ExportInputs, export_recipe
from emu_edge.export.vq import load_vqmodel
from emu_edge.runtime.manifest import Emu2Spec, Emu3Spec, KVSpec, ModelSpec
from emu_edge.runtime.prompt import emu2_layout

DEFAULT_MAX_LENGTH = 4096


class ExportError(RuntimeError):
    """An input folder or file cannot be exported; the message says which and why."""


def add_arguments(parser) -> None:
    parser.add_argument("folder", nargs="?", type=Path,
                        help="a transformers folder (config.json, *.safetensors, tokenizer.json): a causal LM "
                             "(Llama, Qwen2) or an Emu3ForConditionalGeneration")
    parser.add_argument("--llm", type=Path, help="the same as FOLDER (the older spelling)")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    parser.add_argument("--attention", choices=("auto", "gqa", "standard"), default="auto",
                        help="decoder attention: onnxruntime's GroupQueryAttention (gqa), standard ONNX "
                             "ops (standard, for TensorRT), or gqa where the head size allows (auto)")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"longest context the decoder supports (default: the model's "
                             f"max_position_embeddings, at most {DEFAULT_MAX_LENGTH}; for an Emu3 folder, room "
                             "for the largest image it generates, --max-image, and a prompt)")
    parser.add_argument("--max-image", metavar="HxW",
                        help="Emu3 folders: the largest image to generate, in pixels (multiples of the VQ-VAE's "
                             "spatial factor); the default max_length makes room for it (default: the folder's "
                             "image_area, square)")
    parser.add_argument("--vision", type=Path, help="a transformers CLIPVisionModel folder: vision_encoder.onnx")
    parser.add_argument("--unet", type=Path, help="a diffusers UNet2DConditionModel folder: unet.onnx")
    parser.add_argument("--n-query", type=int, default=64,
                        help="visual embeddings per image (a square; its side divides the patch grid)")
    parser.add_argument("--frame-n-query", type=int, default=4, help="visual embeddings per video frame")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    """Errors reach emu_edge.cli, which prints them as one line."""
    if (args.folder is None) == (args.llm is None):
        raise ExportError("give the folder to export once: emu-edge export-hf DIR --out BUNDLE (or --llm DIR)")
    folder = args.folder or args.llm
    max_image = None if args.max_image is None else parse_image_size(args.max_image)
    sources = [p for p in (folder, args.vision, args.unet) if p is not None]
    with BundleWriter(args.out, overwrite=args.overwrite, sources=sources) as writer:
        print(f"exporting to {writer.out}")
        llm = load_llm(folder)
        inputs = ExportInputs(llm=llm, attention=args.attention, max_length=llm.max_length(args.max_length))
        family = llm.source.adapter.family
        if max_image is not None and family != "emu3":
            raise ExportError(f"--max-image sizes the context for the images an Emu3 folder generates; {folder} is "
                              f"a {llm.source.architecture} folder")
        emu3 = None
        if args.vision is not None or args.unet is not None:
            if family != "llm":
                raise ExportError(f"--vision and --unet make an emu2 bundle around a causal LM; {folder} is a "
                                  f"{llm.source.architecture} folder, exported to the {family} family on its own")
            if args.vision is None or args.unet is None:
                raise ExportError("an emu2 bundle needs both --vision and --unet (images in and out)")
            family = "emu2"
            inputs.vision, inputs.unet = args.vision, args.unet
            inputs.n_query, inputs.frame_n_query = args.n_query, args.frame_n_query
        elif family == "emu3":
            # Read (and checked) before any graph is traced: a bad folder fails in a second.
            emu3, emu3_sources = read_emu3_folder(llm.folder, llm.config_json)
            room = ImageRoom.of_folder(llm.folder, llm.config_json, llm.token_id("bos_token_id"))
            inputs.max_length = room.max_length(emu3["image_area"], llm.source.description.max_position_embeddings,
                                                args.max_length, max_image)
            inputs.emu3, inputs.vqmodel = llm.folder, load_vqmodel(llm.folder)
        fields = export_recipe(family, writer, inputs)
        model = dict(fields["model"], family=family)
        if family == "emu2":
            model.update(emu2=Emu2Spec(**fields["emu2"], image_mean=[0.5] * 3, image_std=[0.5] * 3),
                         prompt=emu2_layout(_special_tokens(Path(folder) / "tokenizer.json")))
        if family == "emu3":
            model.update(emu3=Emu3Spec(**fields["emu3"], **emu3), source=dict(model["source"], **emu3_sources))
            layout, template_file = emu3_chat_layout(llm.folder, model.get("bos_token_id"), emu3["image_token_id"])
            if layout is not None:
                model.update(prompt=layout, source=dict(model["source"], chat_template=template_file))
        writer.write_tokenizer(Path(folder) / "tokenizer.json")
        out = writer.finish(ModelSpec(**model))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------


class LlmFolder:
    """A causal LM folder: its decoder source (adapter, description, lazy weights), the
    config.json and generation defaults; `model_fields` gives the ModelSpec fields."""

    def __init__(self, folder: Path, source: DecoderSource, config_json: dict, generation: dict):
        self.folder, self.source, self.config_json, self.generation = folder, source, config_json, generation

    def max_length(self, requested: int | None) -> int:
        if requested is None:
            known = self.source.description.max_position_embeddings or DEFAULT_MAX_LENGTH
            requested = min(int(known), DEFAULT_MAX_LENGTH)
        if requested < 1:
            raise ExportError(f"--max-length must be >= 1, got {requested}")
        return requested

    def token_id(self, key: str):
        """A special token's id: generation_config.json's, else the text config's."""
        return _token_id(self.generation, self.source.config.to_dict(), key=key)

    def model_fields(self, decoder_spec) -> dict:
        d = self.source.description
        return dict(
            vocab_size=d.vocab_size, hidden_size=d.hidden_size, max_length=decoder_spec.max_length,
            kv=KVSpec(num_layers=d.num_layers, num_kv_heads=d.num_kv_heads, head_dim=d.head_dim,
                      dtype="float32", attention=decoder_spec.attention),
            bos_token_id=self.token_id("bos_token_id"), eos_token_id=self.token_id("eos_token_id"),
            pad_token_id=self.token_id("pad_token_id"),
            generation={k: v for k, v in self.generation.items()
                        if k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
                                 "guidance_scale", "negative_prompt")},
            architecture=self.source.architecture,
            source={"llm": self.folder.name, "rope_parameters": d.rope_parameters},
        )


def load_llm(llm_dir: str | Path, family: str | None = None) -> LlmFolder:
    """An HF folder with a decoder (a causal LM, Emu3's text model); its adapter says the
    family of its bundles, which must be `family` where one is asked for."""
    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise ExportError(f"folder {llm_dir} does not exist")
    config_json = _read_json(llm_dir / "config.json")
    source = open_folder(llm_dir, config_json)
    if family is not None and source.adapter.family != family:
        raise ExportError(
            f"{llm_dir} is a {source.architecture} folder, whose bundles are the {source.adapter.family} family; "
            f"{family} bundles take: {', '.join(a for a, x in ADAPTERS.items() if x.family == family)}")
    generation = {}
    if (llm_dir / "generation_config.json").is_file():
        generation = _read_json(llm_dir / "generation_config.json")
    if not (llm_dir / "tokenizer.json").is_file():
        raise ExportError(f"{llm_dir / 'tokenizer.json'} does not exist; the bundle needs a fast-tokenizer "
                          "tokenizer.json (save the tokenizer with save_pretrained)")
    return LlmFolder(llm_dir, source, config_json, generation)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


def _token_id(*sources, key: str):
    for source in sources:
        value = source.get(key)
        if value is not None:
            return value
    return None


def _special_tokens(path: Path) -> dict[str, int]:
    added = _read_json(path).get("added_tokens") or []
    return {t["content"]: t["id"] for t in added if t.get("special") and "content" in t and "id" in t}
