"""What an Emu3ForConditionalGeneration folder says about its images, for the manifest's
`model.emu3` (runtime.manifest.Emu3Spec), besides what the VQ specs read from the VQ-VAE.

    token ids       tokenizer.json's added tokens, by Emu3's names (checked against
                    config.json's vocabulary_map where it has one)
    image processor preprocessor_config.json, or processor_config.json's "image_processor";
                    without either, transformers' Emu3ImageProcessor defaults (the published
                    processor's: 512^2..1024^2 pixels, factor 8, rescale 1/255, CLIP mean/std)
    image_area      processor_config.json's, else Emu3Processor's default (518400 = 720^2)
    prompt layout   the folder's chat template, rendered (export/chat_template.py); without
                    one (or one the layout cannot express: a printed line says so), none,
                    and the runtime writes BOS and the items as they are
    max_length      room for the largest image the bundle will generate (`ImageRoom`)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# Emu3Spec field -> the token's name in Emu3's tokenizer (transformers' Emu3Processor and
# Emu3ImageVocabularyMapping look up the same names).
TOKENS = {
    "eol_token_id": "<|extra_200|>",
    "eof_token_id": "<|extra_201|>",
    "boi_token_id": "<|image start|>",
    "eoi_token_id": "<|image end|>",
    "image_wrapper_token_id": "<|image token|>",
}
PLACEHOLDER = "<image>"            # the processor's image placeholder (optional)
_VISUAL = re.compile(r"<\|visual token (\d{6})\|>")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class Emu3FolderError(ValueError):
    """An Emu3 folder's tokenizer or processor settings are missing or inconsistent."""


def read_emu3_folder(folder: Path, config_json: dict) -> tuple[dict, dict]:
    """-> (Emu3Spec fields other than the VQ-VAE's, {what: the file it came from})."""
    tokenizer = folder / "tokenizer.json"
    vocab = _added_tokens(tokenizer)
    fields, sources = {}, {"tokens": tokenizer.name}
    missing = [name for name in TOKENS.values() if name not in vocab]
    if missing:
        raise Emu3FolderError(f"{tokenizer} lacks Emu3's special token(s) {', '.join(missing)}; "
                              "an Emu3 folder holds the model's own tokenizer")
    fields.update({key: vocab[name] for key, name in TOKENS.items()})
    fields["image_token_id"] = vocab.get(PLACEHOLDER)
    fields["visual_token_start"] = _visual_range(tokenizer, vocab, _codebook_size(config_json))
    _check_vocabulary_map(folder, config_json, vocab)
    processor, sources["processor"] = _image_processor(folder)
    fields.update(processor)
    return fields, sources


def _added_tokens(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Emu3FolderError(f"cannot read {path}: {e}") from e
    return {t["content"]: t["id"] for t in data.get("added_tokens") or [] if "content" in t and "id" in t}


def _codebook_size(config_json: dict) -> int:
    from transformers import Emu3VQVAEConfig

    return int(Emu3VQVAEConfig(**(config_json.get("vq_config") or {})).codebook_size)


def _visual_range(path: Path, vocab: dict[str, int], codebook_size: int) -> int:
    """The id of visual token 0; the runtime maps code c to start + c, so the range must be
    contiguous, in code order, one token per code."""
    codes = {int(m.group(1)): i for name, i in vocab.items() if (m := _VISUAL.fullmatch(name))}
    if len(codes) != codebook_size:
        raise Emu3FolderError(f"{path} has {len(codes)} visual tokens (<|visual token NNNNNN|>) but the VQ-VAE's "
                              f"codebook has {codebook_size} codes")
    start = codes.get(0)
    if start is None or any(codes.get(c) != start + c for c in range(codebook_size)):
        raise Emu3FolderError(f"{path}: the visual tokens are not one contiguous id range in code order "
                              f"(<|visual token 000000|> is {start})")
    return start


def _check_vocabulary_map(folder: Path, config_json: dict, vocab: dict[str, int]) -> None:
    """transformers maps codes to ids through config.json's vocabulary_map: it must agree
    with the tokenizer, or the bundle and transformers would read images differently."""
    mapping = config_json.get("vocabulary_map") or {}
    wrong = [name for name in [*TOKENS.values(), PLACEHOLDER] if name in mapping and mapping[name] != vocab.get(name)]
    wrong += [name for name, i in mapping.items() if _VISUAL.fullmatch(name) and vocab.get(name) != i][:3]
    if wrong:
        raise Emu3FolderError(f"{folder / 'config.json'}'s vocabulary_map and tokenizer.json disagree on the id of "
                              f"{', '.join(wrong)}")


def _image_processor(folder: Path) -> tuple[dict, str]:
    from transformers import Emu3ImageProcessor, Emu3Processor

    found = next((name for name in PROCESSOR_FILES if (folder / name).is_file()), None)
    # from_pretrained reads either file (the image processor's own settings), and the
    # class's defaults fill in what the file does not set.
    processor = Emu3ImageProcessor.from_pretrained(folder) if found else Emu3ImageProcessor()
    image_area = Emu3Processor.image_area
    if (folder / "processor_config.json").is_file():
        image_area = json.loads((folder / "processor_config.json").read_text()).get("image_area", image_area)
    # An enum from the class defaults, a plain int when read from a saved config.
    from PIL import Image

    resample = Image.Resampling(int(processor.resample)).name.lower()
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else ([0.0] * 3, [1.0] * 3)
    fields = dict(resize_factor=int(processor.spatial_factor), min_pixels=int(processor.min_pixels),
                  max_pixels=int(processor.max_pixels), resample=resample,
                  rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
                  image_mean=[float(v) for v in mean], image_std=[float(v) for v in std], image_area=int(image_area))
    return fields, found or "Emu3ImageProcessor defaults"


def emu3_chat_layout(folder: Path, bos_id: int | None, image_id: int | None):
    """-> (the PromptLayout of the folder's chat template, the file it came from), or
    (None, None): no template, or one the layout cannot express (a printed line says why)."""
    from emu_edge.export.chat_template import ChatTemplateError, chat_layout, read_chat_template

    template, source = read_chat_template(folder)
    if template is None:
        return None, None
    from tokenizers import Tokenizer

    name = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(bos_id) if bos_id is not None else None
    bos = (name, bos_id) if name is not None else None
    image = (PLACEHOLDER, image_id) if image_id is not None else None
    try:
        return chat_layout(template, bos, image, special={"bos_token": bos[0] if bos else ""}), source
    except ChatTemplateError as e:
        print(f"{folder / source}: the chat template is not written into the manifest ({e}); "
              "prompts are BOS and the items as given")
        return None, None


# -- the context an image needs -------------------------------------------------------------

# Prompt tokens (the text of a generation prompt) that a default max_length leaves room for
# beside the largest image: Emu3's prompts are a sentence or two, and the runtime refuses
# a longer one by name.
PROMPT_BUDGET = 256


def parse_image_size(text: str) -> tuple[int, int]:
    """"HxW" (pixels, height first, as --height and --width) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise Emu3FolderError(f"--max-image takes HEIGHTxWIDTH in pixels, e.g. 720x720; got {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ImageRoom:
    """Positions in the decoder's cache that generating an image takes: the prompt header
    Emu3Processor writes (BOS, BOI, "{rows}*{cols}", IMAGE_WRAPPER; the runtime's
    image_prompt), PROMPT_BUDGET tokens of text, then rows * (cols + 1) + 1 image tokens
    (each row of codes ends in EOL, then EOF)."""

    factor: int          # pixels per code (the VQ-VAE's spatial factor)
    tokenizer: object    # tokenizers.Tokenizer of the folder
    bos: bool            # whether prompts start with BOS

    @classmethod
    def of_folder(cls, folder: Path, config_json: dict, bos_id: int | None) -> ImageRoom:
        from tokenizers import Tokenizer
        from transformers import Emu3VQVAEConfig

        from emu_edge.export.vq import VQSettings

        factor = VQSettings.from_config(Emu3VQVAEConfig(**(config_json.get("vq_config") or {}))).spatial_factor
        return cls(factor, Tokenizer.from_file(str(folder / "tokenizer.json")), bos_id is not None)

    def parts(self, height: int, width: int) -> tuple[int, int]:
        """(prompt header tokens, image tokens) of a height x width image."""
        rows, cols = height // self.factor, width // self.factor
        size = self.tokenizer.encode(f"{rows}*{cols}", add_special_tokens=False).ids
        return int(self.bos) + 1 + len(size) + 1, rows * (cols + 1) + 1

    def positions(self, height: int, width: int) -> int:
        return sum(self.parts(height, width)) + PROMPT_BUDGET

    def default_size(self, image_area: int) -> tuple[int, int]:
        """The square the runtime generates by default: image_area's side, to whole codes."""
        side = max(1, round(math.sqrt(image_area) / self.factor)) * self.factor
        return side, side

    def check(self, height: int, width: int) -> None:
        f = self.factor
        if height % f or width % f or height < f or width < f:
            below = f"{max(f, height // f * f)}x{max(f, width // f * f)}"
            above = f"{-(-height // f) * f}x{-(-width // f) * f}"
            nearest = below if below == above else f"{below} or {above}"
            raise Emu3FolderError(f"--max-image {height}x{width}: height and width must be multiples of {f} pixels "
                                  f"(the VQ-VAE's pixels per code); the nearest valid sizes are {nearest}")

    def largest_square(self, max_length: int) -> int:
        """The side in pixels of the largest square image that fits max_length (0: none)."""
        side = 0
        while self.positions(side + self.factor, side + self.factor) <= max_length:
            side += self.factor
        return side

    def max_length(self, image_area: int, max_positions: int | None, requested: int | None,
                   max_image: tuple[int, int] | None, log=print) -> int:
        """The decoder's max_length: `requested` (--max-length) if given, else room for
        max_image (--max-image), else for the default image, within max_positions (the
        model's max_position_embeddings). One printed line says which, and why."""
        if max_image is not None:
            self.check(*max_image)
        height, width = max_image or self.default_size(image_area)
        image = f"a {height}x{width} image" + (" (--max-image)" if max_image else
                                               f" (the folder's image_area, {image_area} pixels)")
        header, tokens = self.parts(height, width)
        needed = header + PROMPT_BUDGET + tokens
        if requested is not None:
            if requested < needed:
                log(f"max_length {requested} (--max-length) is short of the {needed} positions {image} and a "
                    f"{PROMPT_BUDGET}-token prompt need; {self._largest(requested)}")
            else:
                log(f"max_length {requested} (--max-length): room for {image} and a {PROMPT_BUDGET}-token prompt, "
                    f"which need {needed}")
            return requested
        if max_positions is not None and needed > max_positions:
            why = (f"{image} and a {PROMPT_BUDGET}-token prompt need {needed} positions, beyond the model's "
                   f"max_position_embeddings {max_positions}; {self._largest(max_positions)}")
            if max_image is not None:
                raise Emu3FolderError(f"--max-image {height}x{width}: {why}")
            log(f"max_length {max_positions} (max_position_embeddings): {why}")
            return max_positions
        log(f"max_length {needed}: {image} is {tokens} tokens with row ends and EOF, plus a {header}-token prompt "
            f"header and {PROMPT_BUDGET} tokens of prompt (--max-image HxW sizes it for another image)")
        return needed

    def _largest(self, max_length: int) -> str:
        side = self.largest_square(max_length)
        if not side:
            return f"no image fits with a {PROMPT_BUDGET}-token prompt"
        return f"the largest square image that fits is {side}x{side}"
