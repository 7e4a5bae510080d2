"""emu3's vocabulary and sequences: the data layer's tasks written as Emu3 writes them.

    vocabulary  our byte-level BPE (<pad> <s> </s> and the corpus), Emu3's special tokens
                by Emu3's names, then one <|visual token NNNNNN|> per VQ code, contiguous
    an image    <|image start|> "{h}*{w}" <|image token|>, h rows of w visual ids each
                followed by EOL (<|extra_200|>), EOF (<|extra_201|>), <|image end|>: the
                ids Emu3ForConditionalGeneration puts where Emu3Processor writes <image>
    captioning  <s> IMAGE " a large red circle" </s>
    VQA, chat   <s> IMAGE "what colour is the circle?" " red" </s> ["next question?" " answer" </s> ...]
    digits      <s> IMAGE " a handwritten digit seven" </s>
    t2i         <s> "a red circle" <|image start|> "8*8" <|image token|> rows EOF <|image end|> </s>
                (the prompt empty a share of the time: classifier-free guidance's branch)

The loss falls on the answers and on the image after its header (what generation
produces), never on the prompt. A prompt text is tokenized as given, as the processor and
the runtime tokenize a user's string; an answer starts with a space, so that "question?
answer" reads as text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from emu_edge import data

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Emu3's own names: transformers' Emu3Processor and Emu3ImageVocabularyMapping look them up,
# and the exporter reads the same (export/emu3_folder.py).
BOI, EOI, WRAPPER, EOL, EOF, PLACEHOLDER = ("<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>",
                                            "<|extra_201|>", "<image>")
EMU3_SPECIAL = (BOI, EOI, WRAPPER, EOL, EOF, PLACEHOLDER)
# tokenizer_config.json's names for them (Emu3Processor reads tokenizer.image_token, ...)
PROCESSOR_TOKENS = {"image_token": PLACEHOLDER, "boi_token": BOI, "eoi_token": EOI, "image_wrapper_token": WRAPPER,
                    "eof_token": EOF}


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


def build_tokenizer(text_vocab_size: int, codebook_size: int):
    """The BPE trained on the data's corpus, then Emu3's specials and the visual tokens as
    added special tokens (as Emu3's own tokenizer.json holds them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Prompts and questions open a text (no space before the first word); answers and
    # captions follow one with a space.
    corpus = data.corpus()
    tok.train_from_iterator(corpus + [" " + line for line in corpus], trainer)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in EMU3_SPECIAL])
    tok.add_special_tokens([AddedToken(visual_token(c), special=True, normalized=False) for c in range(codebook_size)])
    return tok


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    wrapper: int
    eol: int
    eof: int
    placeholder: int
    visual_start: int
    codebook_size: int

    @classmethod
    def of(cls, tok, codebook_size: int) -> TokenIds:
        names = {"bos": BOS, "eos": EOS, "pad": PAD, "boi": BOI, "eoi": EOI, "wrapper": WRAPPER, "eol": EOL,
                 "eof": EOF, "placeholder": PLACEHOLDER, "visual_start": visual_token(0)}
        ids = {k: tok.token_to_id(v) for k, v in names.items()}
        missing = [names[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; build it with emu3_format.build_tokenizer")
        last = tok.token_to_id(visual_token(codebook_size - 1))
        if last != ids["visual_start"] + codebook_size - 1:
            raise ValueError("the visual tokens are not one contiguous range in code order")
        return cls(**ids, codebook_size=codebook_size)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("bos", "eos", "pad")}


class CodeCache:
    """Images -> VQ codes, each image encoded once, alone: the frozen VQ-VAE's codes of an
    image then never depend on which other images shared its batch (batched convolutions
    round differently, and a near-tie flips a code), so a resumed run and the eval see the
    codes an uninterrupted run saw."""

    def __init__(self, vq, processor):
        self.vq, self.processor = vq, processor
        self._codes: dict[bytes, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] -> int64 codes [S/f, S/f]."""
        pixels = np.ascontiguousarray(image)
        key = hashlib.blake2b(pixels.tobytes(), digest_size=16).digest() + repr(pixels.shape).encode()
        if key not in self._codes:
            import torch

            from emu_edge.training.vq import to_pixels

            pixels = to_pixels(image[None], self.processor)
            with torch.no_grad():
                codes = self.vq.encode(pixels, image_sizes=torch.tensor([pixels.shape[-2:]])).image_tokens[0]
            self._codes[key] = codes.numpy().astype(np.int16)
        return self._codes[key].astype(np.int64)


@dataclass
class Sequence:
    ids: list[int] = field(default_factory=list)
    # Per position: the id to predict next (-100: no loss), as the emu2 stages mark it.
    targets: list[int] = field(default_factory=list)
    kind: str = "text"  # "text" (the loss is on answers) or "image" (on a generated image)

    def add(self, ids, loss: bool = False) -> None:
        for i in ids:
            if loss and self.ids:
                self.targets[-1] = int(i)
            self.ids.append(int(i))
            self.targets.append(-100)


class Emu3Format:
    """Samples -> Sequences in Emu3's formats (the module docstring)."""

    def __init__(self, tok, ids: TokenIds):
        self.tok, self.t = tok, ids

    def text(self, value: str) -> list[int]:
        return self.tok.encode(value, add_special_tokens=False).ids

    def header(self, rows: int, cols: int) -> list[int]:
        """BOI "{rows}*{cols}" IMAGE_WRAPPER: what opens an image, and ends a generation prompt."""
        return [self.t.boi] + self.text(f"{rows}*{cols}") + [self.t.wrapper]

    def body(self, codes: np.ndarray) -> list[int]:
        """The rows of visual ids each ending in EOL, then EOF and EOI."""
        rows = np.concatenate([codes + self.t.visual_start, np.full((codes.shape[0], 1), self.t.eol)], axis=1)
        return rows.reshape(-1).tolist() + [self.t.eof, self.t.eoi]

    def image(self, codes: np.ndarray) -> list[int]:
        return self.header(*codes.shape) + self.body(codes)

    def image_prompt(self, prompt: str, rows: int, cols: int) -> list[int]:
        """<s> prompt BOI "{h}*{w}" IMAGE_WRAPPER: Emu3Processor's generation prompt."""
        return [self.t.bos] + self.text(prompt) + self.header(rows, cols)

    def encode(self, sample, codes_of, drop_prompt: bool = False) -> Sequence:
        """One data sample; codes_of maps an image to its codes (a CodeCache)."""
        if sample.task == "text_to_image":
            prompt = "" if drop_prompt else sample.segments[0].value
            codes = codes_of(sample.segments[-1].value)
            seq = Sequence(kind="image")
            seq.add(self.image_prompt(prompt, *codes.shape))
            seq.add(self.body(codes) + [self.t.eos], loss=True)
            return seq
        seq = Sequence()
        seq.add([self.t.bos])
        for seg in sample.segments:
            if seg.kind == "image":
                seq.add(self.image(codes_of(seg.value)))
            elif seg.kind == "text":
                seq.add(self.text(seg.value))
            elif seg.kind == "answer":
                seq.add(self.text(" " + seg.value) + [self.t.eos], loss=True)
            else:
                raise ValueError(f"emu3's decoder stage does not train {sample.task!r} samples ({seg.kind} segments); "
                                 "leave the task out of the mixture")
        return seq
