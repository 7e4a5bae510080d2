"""Tiny models from the real classes, for tests: Hugging Face Llama and Qwen2 folders, Emu3's
VQ-VAE and whole Emu3ForConditionalGeneration folders (`make_emu3_folder`).

`make_llm_folder(path, preset)` writes what `emu-edge export-hf --llm` reads: config.json,
model.safetensors, generation_config.json and a tokenizer.json built with `tokenizers`.
The presets cover the decoder variants the exporter must handle (MHA, GQA, head sizes the
GroupQueryAttention kernel refuses, an explicit head_dim, rope settings, tied embeddings).
"""

from __future__ import annotations

import json

from pathlib import Path

# Every preset: 2 layers, vocab 256; hidden 64-96.
LLM_PRESETS: dict[str, dict] = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    # head_dim 24: GroupQueryAttention's CPU kernel wants a multiple of 16 -> "standard"
    "head24": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
    # explicit head_dim differing from hidden / heads (64 / 4 = 16)
    "head_dim32": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "theta_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=True),
    "llama3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),
}
VOCAB_SIZE = 256
SPECIAL = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def llm_config(preset: str, **overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=VOCAB_SIZE, intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
                    max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                    eos_token_id=EOS_ID, tie_word_embeddings=False)
    settings.update(LLM_PRESETS[preset])
    settings.update(overrides)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    return config


def build_llm(preset: str, seed: int = 0, **overrides):
    """A random LlamaForCausalLM whose greedy choices are decisive: the output layer is
    scaled up so top-2 logit gaps are far above float32 noise."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llm_config(preset, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(5.0)
    return model


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer with exactly vocab_size entries: the specials, then w3, w4, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tok


def qwen2_config(**overrides):
    """Qwen2: q/k/v biases, otherwise Llama's block; full attention (no sliding window)."""
    from transformers import Qwen2Config

    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)
    settings.update(overrides)
    config = Qwen2Config(**settings)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def build_qwen2(seed: int = 0, **overrides):
    """A random Qwen2ForCausalLM with decisive greedy choices (as build_llm), its biases
    random too so a dropped bias shows."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(5.0)
    return model


def make_qwen2_folder(path: Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    model = build_qwen2(seed, **overrides)
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save(str(path / "tokenizer.json"))
    return path


def make_llm_folder(path: Path, preset: str, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    model = build_llm(preset, seed, **overrides)
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save(str(path / "tokenizer.json"))
    return path


# -- Emu3's VQ-VAE -------------------------------------------------------------------------

# Channels are multiples of 32 (GroupNorm(32)); latent_channels == embed_dim (the decoder
# runs its codes and their embeddings through one temporal stack, concatenated on the
# batch axis); the attention width equals the channels at every attention level.
VQ_PRESETS: dict[str, dict] = {
    # spatial factor 2, temporal factor 2 (one temporal down/upsampling), attention at level 1
    "f2": dict(codebook_size=64, embed_dim=4, latent_channels=4, temporal_downsample_factor=2,
               base_channels=32, channel_multiplier=[1, 2], attn_resolutions=[1], hidden_size=64),
    # spatial factor 4, temporal factor 4 (Emu3's own), two attention heads in the middle blocks
    "f4": dict(codebook_size=96, embed_dim=8, latent_channels=8, temporal_downsample_factor=4,
               base_channels=32, channel_multiplier=[1, 1, 2], attn_resolutions=[], hidden_size=64,
               num_attention_heads=2),
}


def build_vq(preset: str, seed: int = 0, **config):
    """A random Emu3VQVAE (num_res_blocks 1; `config` overrides the preset's settings), eval
    mode. Norm affines and BatchNorm3d statistics are random too (defaults of ones and zeros
    would hide a dropped or misplaced norm), and the codebook is drawn at the scale of the
    encoder's outputs, so codes are spread over it rather than decided by float32 near-ties."""
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(seed)
    model = Emu3VQVAE(Emu3VQVAEConfig(**{"num_res_blocks": 1, **VQ_PRESETS[preset], **config})).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        model.quantize.embedding.weight.normal_(0.0, 1.0)
    return model


# -- Emu3: one Emu3ForConditionalGeneration folder -----------------------------------------

# The VQ preset and the text model's attention: "f2" MHA with head size 16 (the decoder
# exports with GroupQueryAttention), "f4" GQA with head size 24 (standard attention).
EMU3_PRESETS: dict[str, dict] = {
    "f2": dict(vq="f2", hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "f4": dict(vq="f4", hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
}
EMU3_TEXT_WORDS = 128            # ids 0..127: the specials, then w3 .. w127
# Emu3's own names (transformers' Emu3Processor and Emu3ImageVocabularyMapping look them up)
EMU3_SPECIAL = ["<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<image>"]
EMU3_VISUAL_START = 140          # a gap after the specials, so no id is right by coincidence
EMU3_VOCAB_SIZE = 256


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


def build_emu3_tokenizer(codebook_size: int, vocab_size: int = EMU3_VOCAB_SIZE):
    """build_tokenizer's words, Emu3's special tokens from id 128, and the visual tokens
    (one per code) from id EMU3_VISUAL_START, all as added special tokens, as Emu3's own
    tokenizer.json holds them; at most vocab_size ids."""
    from tokenizers import AddedToken

    tok = build_tokenizer(EMU3_TEXT_WORDS)
    for name in EMU3_SPECIAL:
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    for i in range(EMU3_TEXT_WORDS + len(EMU3_SPECIAL), EMU3_VISUAL_START):   # fillers up to the visual range
        tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(visual_token(c), special=True, normalized=False) for c in range(codebook_size)])
    assert tok.token_to_id(visual_token(0)) == EMU3_VISUAL_START
    assert tok.get_vocab_size() <= vocab_size
    return tok


def build_emu3(preset: str, seed: int = 0):
    """A random Emu3ForConditionalGeneration, eval mode, with its tokenizer: the text model
    as build_llm makes it (decisive logits), the VQ-VAE as build_vq makes it."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    settings = dict(EMU3_PRESETS[preset])
    vq = build_vq(settings.pop("vq"), seed)
    tok = build_emu3_tokenizer(vq.config.codebook_size)
    text = dict(vocab_size=EMU3_VOCAB_SIZE, intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
                max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                **settings)
    config = Emu3Config(text_config=text, vq_config=vq.config.to_dict(), vocabulary_map=tok.get_vocab())
    config.architectures = ["Emu3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.vqmodel."):
                p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(5.0)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    return model, tok


EMU3_GENERATION = dict(do_sample=True, top_k=64, max_new_tokens=300, guidance_scale=3.0)


# A chat template of the published Emu3-Chat form: a system message's text first, then
# "USER: " and "ASSISTANT: " turns, each turn's images before its texts, a space after each
# text, "ASSISTANT:" as the generation prompt; no end-of-turn token.
EMU3_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' }}{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% for part in m['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for part in m['content'] if part['type'] == 'text' %}{{ part['text'] ~ ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# The template's role words, as tokens of the tiny tokenizer (two of its fillers renamed).
EMU3_ROLE_TOKENS = ("USER:", "ASSISTANT:")


def make_emu3_folder(path: Path, preset: str, seed: int = 0, chat_template: str | None = None) -> Path:
    """save_pretrained of build_emu3's model, its tokenizer.json and a generation_config.json
    (no processor config: the exporter falls back to the processor's defaults).
    chat_template: also a chat_template.jinja, with the template's role words as tokens."""
    from transformers import GenerationConfig

    path = Path(path)
    model, tok = build_emu3(preset, seed)
    model.generation_config = GenerationConfig(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               **EMU3_GENERATION)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    if chat_template is not None:
        data = json.loads((path / "tokenizer.json").read_text())
        fillers = [t for t in data["added_tokens"] if t["content"].startswith("<|extra_") and
                   t["content"] not in EMU3_SPECIAL]
        for token, word in zip(fillers, EMU3_ROLE_TOKENS):
            token.update(content=word, special=False)
        (path / "tokenizer.json").write_text(json.dumps(data))
        (path / "chat_template.jinja").write_text(chat_template)
    return path


def make_emu3_bundle(root: Path, preset: str, *export_args: str, image_area: int | None = None) -> Path:
    """`emu-edge export-hf` of a make_emu3_folder folder into root/"bundle", with a small
    image processor (images of 64..256 pixels, so an image prompt fits the 128-position
    cache) and, if given, a processor_config.json image_area (the default image size)."""
    import json

    from transformers import Emu3ImageProcessor

    from emu_edge.cli import main

    root = Path(root)
    folder = make_emu3_folder(root / "folder", preset)
    Emu3ImageProcessor(min_pixels=8 * 8, max_pixels=16 * 16, spatial_factor=8).save_pretrained(folder)
    if image_area is not None:
        (folder / "processor_config.json").write_text(json.dumps({"image_area": image_area}))
    out = root / "bundle"
    assert main(["export-hf", str(folder), "--out", str(out), "--max-length", "128", *export_args]) == 0
    return out


def prefix_allowed(spec, rows: int, cols: int, eos: int, pad: int):
    """The row constraint as transformers' Emu3 docs write it for `generate`: counted from
    the image wrapper token, w visual ids then EOL per row, then EOF, EOI, EOS."""
    import torch

    visual = list(spec.visual_ids())

    def allowed(batch_id: int, input_ids) -> list[int]:
        position = torch.nonzero(input_ids == spec.image_wrapper_token_id, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (cols + 1) == 0:
            return [spec.eol_token_id]
        if offset == (cols + 1) * rows + 1:
            return [spec.eof_token_id]
        if offset == (cols + 1) * rows + 2:
            return [spec.eoi_token_id]
        if offset == (cols + 1) * rows + 3:
            return [eos]
        if offset > (cols + 1) * rows + 3:
            return [pad]
        return visual

    return allowed


def reference_tokens(pipe, model, prompt: str, rows: int, cols: int, guidance: float = 1.0,
                     negative: str | None = None):
    """transformers' greedy generate with the prefix constraint (and its CFG processor):
    the new tokens, rows * (cols + 1) + 3 of them (through EOF, EOI, EOS)."""
    import numpy as np
    import torch

    family = pipe.family
    ids = torch.tensor([family.image_prompt(prompt, rows, cols)])
    extra = {}
    if guidance != 1:
        extra = dict(negative_prompt_ids=torch.tensor([family.image_prompt(negative or "", rows, cols)]))
    m = pipe.manifest.model
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=rows * (cols + 1) + 3, guidance_scale=guidance,
                             prefix_allowed_tokens_fn=prefix_allowed(m.emu3, rows, cols, m.eos_token_id,
                                                                     m.pad_token_id), **extra)
    return out[0, ids.shape[1]:].numpy()
