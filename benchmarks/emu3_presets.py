"""Random-weight Emu3 folders from transformers' own classes, for the image-generation
benchmarks: `Emu3ForConditionalGeneration.save_pretrained` plus tokenizer.json, processor
and generation configs, so transformers loads it with from_pretrained and `emu-edge
export-hf` exports it as it would a published folder.

    emu3-30m     text model as decoder-30m (Llama: hidden 512, 8 layers, 8 heads x 64,
                 MLP 1408, vocab 4096): 29.9M parameters; Emu3VQVAE at base width 32
                 (channels 32, 64, 64, 128; 2 res blocks; attention at the coarsest level;
                 spatial factor 8, temporal factor 4: Emu3's layout at 1/8 of its width),
                 codebook 2048; default image 256x256 pixels = 32x32 codes
    emu3-smoke   hidden 64, 2 layers, vocab 512, a one-block VQ-VAE of width 32, codebook
                 128; default image 32x32 pixels = 4x4 codes (CI)

The text model is also written as a LlamaForCausalLM folder (`llama_folder`): Emu3's text
model is exactly Llama, and onnxruntime-genai's builder takes Llama folders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .presets import built_once


@dataclass(frozen=True)
class Emu3Preset:
    name: str
    description: str
    text: dict                      # Emu3TextConfig fields
    vq: dict                        # Emu3VQVAEConfig fields
    text_vocab: int                 # BPE entries before Emu3's special and visual tokens
    image_side: int                 # default image side in pixels (processor_config image_area)

    def key(self) -> str:
        """Changes whenever the folder a preset builds would change."""
        text = json.dumps({"name": self.name, "text": self.text, "vq": self.vq, "text_vocab": self.text_vocab,
                           "image_side": self.image_side, "init": INIT_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# Bumped when the builder changes, so cached folders are rebuilt.
INIT_VERSION = 2

EMU3_PRESETS: dict[str, Emu3Preset] = {p.name: p for p in [
    Emu3Preset("emu3-30m", "Emu3, text model hidden 512, 8 layers, vocab 4096 (~30M); VQ-VAE width 32",
               text=dict(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=4096),
               vq=dict(codebook_size=2048, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[3], hidden_size=128,
                       num_attention_heads=1, temporal_downsample_factor=4),
               text_vocab=512, image_side=256),
    Emu3Preset("emu3-smoke", "Emu3, text model hidden 64, 2 layers, vocab 512; VQ-VAE width 32, one block",
               text=dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512),
               vq=dict(codebook_size=128, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                       num_attention_heads=1, temporal_downsample_factor=4),
               text_vocab=300, image_side=32),
]}


def build_tokenizer(preset: Emu3Preset):
    """The trained model's tokenizer at the preset's sizes (training/emu3_format.py): a
    byte-level BPE on the data layer's caption corpus (so prompts like "a red circle" are a
    few ordinary tokens), then Emu3's special tokens, then one visual token per code."""
    from emu_edge.training.emu3_format import build_tokenizer as emu3_tokenizer

    tok = emu3_tokenizer(preset.text_vocab, preset.vq["codebook_size"])
    if tok.get_vocab_size() > preset.text["vocab_size"]:
        raise ValueError(f"{preset.name}: the tokenizer has {tok.get_vocab_size()} ids, more than the text model's "
                         f"vocabulary of {preset.text['vocab_size']}")
    return tok


def _randomize(model, seed: int) -> None:
    """The text model at a trained model's scale (variance-preserving linears) with an
    output layer sharp enough that greedy choices are decisive, as presets._randomize
    does; the codebook at the scale of the encoder's outputs. The VQ-VAE's other weights
    keep transformers' initialisation (what they hold does not change what they cost)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.text_model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        model.lm_head.weight.normal_(0.0, 5.0 * model.lm_head.in_features ** -0.5, generator=gen)
        model.model.vqmodel.quantize.embedding.weight.normal_(0.0, 1.0, generator=gen)


def build_folder(preset: Emu3Preset, out: Path, seed: int = 0) -> Path:
    """Write the preset's random Emu3ForConditionalGeneration folder to `out`."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, GenerationConfig

    from emu_edge.training.emu3_format import BOS, EOS, PAD

    tok = build_tokenizer(preset)
    ids = {name: tok.token_to_id(name) for name in (PAD, BOS, EOS)}
    config = Emu3Config(text_config=dict(preset.text, pad_token_id=ids[PAD], bos_token_id=ids[BOS],
                                         eos_token_id=ids[EOS]),
                        vq_config=preset.vq, vocabulary_map=tok.get_vocab())
    config.architectures = ["Emu3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.generation_config = GenerationConfig(pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                                               do_sample=True, guidance_scale=3.0)
    out = Path(out)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    # Input images are resized to the generated size; image_area is the default size the
    # bundle generates (and the one export-hf sizes its cache for).
    area = preset.image_side ** 2
    Emu3ImageProcessor(min_pixels=area, max_pixels=area, spatial_factor=8).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_area": area}))
    return out


def llama_folder(folder: Path, out: Path) -> Path:
    """The Emu3 folder's text model as a LlamaForCausalLM folder under out/"llm" (the
    layout peers.genai_build reads), with its tokenizer; checked to give the same logits
    as Emu3's own text model before it is written."""
    built_once(Path(out) / "llm", "config.json", lambda tmp: _write_llama(folder, tmp))
    return Path(out)


def _write_llama(folder: Path, llm: Path) -> None:
    import torch
    from transformers import Emu3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    emu3 = Emu3ForConditionalGeneration.from_pretrained(folder).eval()
    text = emu3.config.text_config
    config = LlamaConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                         max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                         rope_parameters=text.rope_parameters, hidden_act=text.hidden_act,
                         pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
                         eos_token_id=text.eos_token_id, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    llama = LlamaForCausalLM(config).eval()
    state = {k.removeprefix("model.text_model."): v for k, v in emu3.state_dict().items()
             if k.startswith("model.text_model.")}
    llama.model.load_state_dict(state)
    llama.lm_head.load_state_dict(emu3.lm_head.state_dict())
    probe = torch.arange(3, 35)[None] % text.vocab_size
    with torch.no_grad():
        gap = float((llama(probe).logits - emu3(input_ids=probe).logits).abs().max())
    if gap > 1e-4:
        raise RuntimeError(f"the Llama copy of {folder}'s text model differs from it (max logit gap {gap:.2e})")
    llama.save_pretrained(llm)
    shutil.copy(Path(folder) / "tokenizer.json", llm / "tokenizer.json")
