"""The decoder over a KV cache that is allocated once and written in place.

    cache = KVCache(backend, kv_spec, batch, max_length)   # 2 x layers buffers
            [batch, kv_heads, max_length, head_dim], allocated before the first step
    session = DecoderSession(backend, model_spec, batch, max_length)
    session.prefill(embeds [B, S, H], lengths)  -> logits [B, V] at each row's last token
    session.step(embeds [B, 1, H])              -> the next position of every row
    session.step_ids(ids [B, 1], embed_backend, embed)
                                                -> the same from token ids (on the CPU
                                                   embed.onnx writes the bound step input)
    session.step_regressed(image_id, embed_backend, embed)
                                                -> the same from each row's last regressed
                                                   embedding (the image regression loop)
    session.extend(embeds [B, S, H])            -> S more tokens per row (a new chat turn)

The same device buffers are bound as the graph's past inputs and present outputs, so a
step neither reallocates nor copies the cache: the graph writes only the new rows. On the
CPU the lengths, the step's embeddings and the outputs are host arrays bound once too, so
a decode step makes no new binding at all (a step is ~1 ms; per-call binding and
conversion work was a measurable part of it). Each row keeps its own length (`lengths`):
a batch of prompts of different lengths is right-padded for the prefill and every row
then grows from where it ended, at the positions it would have alone. seqlens_k /
total_sequence_length are derived from those lengths (see emu_edge.export.decoder for
the graph side of the contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emu_edge.runtime.manifest import KVSpec, ModelSpec


class DecoderError(RuntimeError):
    pass


class ContextTooLongError(DecoderError):
    pass


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


@dataclass
class DecoderOutput:
    logits: np.ndarray                  # [B, vocab] at each row's last position
    regressed: np.ndarray | None = None  # [B, visual_dim] (Emu2's regression head)


class KVCache:
    """Key and value buffers for every layer, [batch, kv_heads, max_length, head_dim]."""

    def __init__(self, backend, spec: KVSpec, batch: int, max_length: int):
        if batch < 1 or max_length < 1:
            raise DecoderError(f"batch and max_length must be >= 1, got batch={batch}, max_length={max_length}")
        self.spec, self.batch, self.max_length = spec, batch, max_length
        self.nbytes = spec.bytes_for(batch, max_length)
        if backend.device == "cpu":
            self._check_memory()
        # The device memory check is left to the allocator: onnxruntime reports a failed
        # CUDA allocation itself, and there is no portable free-memory query without CUDA
        # bindings.
        dtype = np.dtype(spec.dtype)
        shape = [batch, spec.num_kv_heads, max_length, spec.head_dim]
        # Zeroed once: the "standard" graph multiplies masked positions by a probability of
        # exactly 0, and 0 x NaN from never-written memory would still be NaN. Later reuse
        # leaves finite old values there, which the masks cancel.
        self.buffers = [(backend.allocate(shape, dtype, zeros=True), backend.allocate(shape, dtype, zeros=True))
                        for _ in range(spec.num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)  # tokens held per row

    def _check_memory(self) -> None:
        available = available_memory_bytes()
        if available is not None and self.nbytes > available:
            s = self.spec
            raise DecoderError(
                f"the KV cache for batch {self.batch} at max_length {self.max_length} needs {_gib(self.nbytes)} "
                f"(2 x {s.num_layers} layers x {self.batch} x {s.num_kv_heads} kv heads x {self.max_length} "
                f"x {s.head_dim} x {np.dtype(s.dtype).itemsize} bytes) but only {_gib(available)} is available "
                f"(MemAvailable). Lower max_length (Pipeline.load(..., max_length=N)) or the batch size.")

    def reset(self) -> None:
        # No clearing needed: old contents are finite, and each row is read only up to its
        # length (or masked there).
        self.lengths[:] = 0


class DecoderSession:
    """Runs decoder.onnx over one KVCache through an IOBinding set up once."""

    def __init__(self, backend, model: ModelSpec, batch: int, max_length: int):
        self.backend = backend
        self.model = model
        self.cache = KVCache(backend, model.kv, batch, max_length)
        self.batch, self.max_length = batch, max_length
        self.binding = backend.bind()
        for i, (key, value) in enumerate(self.cache.buffers):
            # Same buffer in and out: the graph writes the new rows into it in place.
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.key", key)
            self.binding.bind_ortvalue_output(f"present.{i}.key", key)
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.value", value)
            self.binding.bind_ortvalue_output(f"present.{i}.value", value)
        # On the CPU every small input and output is a host array bound once: a call writes
        # the lengths and the step's embeddings into them and reads the outputs from them,
        # with no OrtValue made, bound or converted per token. Elsewhere (CUDA, TensorRT)
        # inputs are bound per call and outputs copied back from the device.
        self._host = backend.device == "cpu"
        self._seqlens_k = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._step_embeds = np.zeros((batch, 1, model.hidden_size), np.float32)
        self._step_bound = False   # whether inputs_embeds is bound to _step_embeds
        self.logits, self._logits_host = self._output("logits", [batch, model.vocab_size])
        self.regressed, self._regressed_host = None, None
        if "regressed" in backend.output_names:
            visual_dim = backend.output_shapes["regressed"][1]
            self.regressed, self._regressed_host = self._output("regressed", [batch, visual_dim])
        if self._host:
            for name, array in (("seqlens_k", self._seqlens_k), ("total_sequence_length", self._total)):
                self.binding.bind_ortvalue_input(name, self._wrap(array))
            self._step_value = self._wrap(self._step_embeds)
        self._step_ids = np.zeros((batch, 1), np.int64)
        self._image_ids = np.zeros((batch, 1), np.int64)
        self._embed_bindings: dict = {}   # kind -> (embed backend, its IOBinding into _step_embeds)
        self._longest = 0            # the longest row's length (cache.lengths.max())

    def _wrap(self, array: np.ndarray):
        """An OrtValue over `array`'s memory (CPU): writes to the array are what the graph reads."""
        from emu_edge.runtime.backends import import_onnxruntime

        return import_onnxruntime().OrtValue.ortvalue_from_numpy(array)

    def _output(self, name: str, shape: list) -> tuple:
        """(the bound buffer, its host array on the CPU or None)."""
        if self._host:
            host = np.zeros(shape, np.float32)
            buffer = self._wrap(host)
        else:
            host, buffer = None, self.backend.allocate(shape, np.float32)
        self.binding.bind_ortvalue_output(name, buffer)
        return buffer, host

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths.copy()

    def reset(self) -> None:
        self.cache.reset()
        self._longest = 0

    def prefill(self, inputs_embeds: np.ndarray, lengths=None) -> DecoderOutput:
        """Start over with a (right-padded) batch of prompts; lengths[b] real tokens in row b."""
        embeds = self._check_embeds(inputs_embeds)
        counts = np.full(self.batch, embeds.shape[1], np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if counts.shape != (self.batch,) or counts.min() < 1 or counts.max() > embeds.shape[1]:
            raise DecoderError(f"lengths must give 1..{embeds.shape[1]} tokens for each of the {self.batch} "
                               f"rows, got {counts.tolist()}")
        self.reset()
        # Padding past the longest row would make the graph take this for a continuation.
        return self._forward(embeds[:, : int(counts.max())], counts)

    def extend(self, inputs_embeds: np.ndarray) -> DecoderOutput:
        """Append S tokens to every row (the next turn of a conversation, or one step)."""
        embeds = self._check_embeds(inputs_embeds)
        if self._longest == 0:
            return self.prefill(embeds)
        steps = embeds.shape[1]
        self._check_room(self.cache.lengths + steps)
        if steps > 1 and self.batch > 1:
            # GroupQueryAttention takes several new tokens on a non-empty cache only for
            # batch 1; one token at a time is the same computation for every row.
            out = None
            for s in range(steps):
                out = self._forward(embeds[:, s : s + 1], np.ones(self.batch, np.int64))
            return out
        return self._forward(embeds, steps)

    def step(self, inputs_embeds: np.ndarray) -> DecoderOutput:
        embeds = self._check_embeds(inputs_embeds)
        if embeds.shape[1] != 1:
            raise DecoderError(f"step() takes one position per row, got {embeds.shape[1]}; use extend()")
        return self.extend(embeds)

    def step_ids(self, token_ids: np.ndarray, embed_backend, embed) -> DecoderOutput:
        """step() for one token id per row ([B, 1] int64). On the CPU, embed.onnx (run by
        `embed_backend`) writes straight into the bound step input, so a token costs two
        bound graph runs and a copy of the logits; elsewhere the ids go through `embed`
        (ids -> inputs_embeds) and step()."""
        if token_ids.shape != (self.batch, 1):
            raise DecoderError(f"step_ids() takes token ids of shape [{self.batch}, 1], got {list(token_ids.shape)}")
        if not self._bound_embed_ok(embed_backend):
            return self.step(embed(token_ids))
        binding = self._embed_binding_for("text", embed_backend)
        self._step_ids[:] = token_ids
        embed_backend.run_bound(binding)
        return self._forward(self._step_embeds, 1)

    def step_regressed(self, image_id: int, embed_backend, embed) -> DecoderOutput:
        """One more position per row whose input is an <image> token carrying that row's
        last regressed embedding: Emu2's regression loop. On the CPU embed.onnx reads the
        bound `regressed` output and writes the bound step input, so nothing is copied
        between the two graphs; elsewhere it goes through `embed` (ids, image_embeds)."""
        if self.regressed is None:
            raise DecoderError("this decoder has no regression head (no 'regressed' output)")
        if self._longest == 0:
            raise DecoderError("step_regressed() continues a filled cache: prefill first")
        if not self._bound_embed_ok(embed_backend) or "image_embeds" not in embed_backend.input_names:
            # embed() has read `last` before the next decoder run overwrites it: no copy needed.
            last = self._regressed_host if self._host else self.regressed.numpy()
            return self.step(embed(np.full((self.batch, 1), image_id, np.int64), last))
        binding = self._embed_binding_for("image", embed_backend)
        self._image_ids[:] = image_id
        embed_backend.run_bound(binding)
        return self._forward(self._step_embeds, 1)

    def _bound_embed_ok(self, embed_backend) -> bool:
        """Whether embed.onnx can run bound into the step input: both on the CPU, and a
        cache to continue."""
        return self._host and embed_backend.device == "cpu" and self._longest > 0

    def _embed_binding_for(self, kind: str, embed_backend):
        """The embed graph's IOBinding into the step input, made once per kind and backend:
        "text" reads _step_ids and no visual embeddings, "image" reads _image_ids and the
        decoder's bound regressed output."""
        cached = self._embed_bindings.get(kind)
        if cached is None or cached[0] is not embed_backend:
            binding = embed_backend.bind()
            if kind == "text":
                binding.bind_ortvalue_input("input_ids", self._wrap(self._step_ids))
                if "image_embeds" in embed_backend.input_names:
                    # Text tokens: no visual embeddings to splice in (0 rows, as Pipeline.embed feeds).
                    none = np.zeros([0, embed_backend.input_shapes["image_embeds"][1]], np.float32)
                    binding.bind_ortvalue_input("image_embeds", self._wrap(none))
            else:
                binding.bind_ortvalue_input("input_ids", self._wrap(self._image_ids))
                binding.bind_ortvalue_input("image_embeds", self.regressed)
            binding.bind_ortvalue_output("inputs_embeds", self._step_value)
            cached = self._embed_bindings[kind] = (embed_backend, binding)
        return cached[1]

    def _check_embeds(self, inputs_embeds: np.ndarray) -> np.ndarray:
        embeds = np.ascontiguousarray(inputs_embeds, dtype=np.float32)
        expected = (self.batch, self.model.hidden_size)
        if embeds.ndim != 3 or (embeds.shape[0], embeds.shape[2]) != expected or embeds.shape[1] < 1:
            raise DecoderError(f"inputs_embeds must have shape [{self.batch}, S >= 1, {self.model.hidden_size}], "
                               f"got {list(embeds.shape)}")
        return embeds

    def _check_room(self, totals: np.ndarray) -> None:
        if totals.max() > self.max_length:
            raise ContextTooLongError(
                f"the context would grow to {int(totals.max())} tokens, beyond max_length {self.max_length}. "
                f"Start a new conversation, shorten the prompt or max_new_tokens, or load with a larger "
                f"max_length (this bundle's decoder supports up to {self.model.max_length}).")

    def _forward(self, embeds: np.ndarray, counts) -> DecoderOutput:
        """Run the graph on S new positions per row; counts: real tokens per row ([B] or one int)."""
        lengths = self.cache.lengths
        totals = lengths + counts
        # A Python int: a decode step is short enough that each numpy reduction shows.
        longest = int(totals.max())
        if longest > self.max_length:
            self._check_room(totals)
        np.subtract(totals, 1, out=self._seqlens_k, casting="unsafe")
        self._total[()] = longest
        if self._host and embeds.shape[1] == 1:
            if embeds is not self._step_embeds:
                self._step_embeds[:] = embeds
            if not self._step_bound:
                self.binding.bind_ortvalue_input("inputs_embeds", self._step_value)
                self._step_bound = True
        else:
            self.binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
            self._step_bound = False
            if not self._host:
                self.binding.bind_cpu_input("seqlens_k", self._seqlens_k)
                self.binding.bind_cpu_input("total_sequence_length", self._total)
        self.backend.run_bound(self.binding)
        lengths[:] = totals
        self._longest = longest
        # Copies: the bound outputs are overwritten by the next call.
        if self._host:
            return DecoderOutput(logits=self._logits_host.copy(),
                                 regressed=None if self._regressed_host is None else self._regressed_host.copy())
        return DecoderOutput(logits=self.logits.numpy().copy(),
                             regressed=None if self.regressed is None else self.regressed.numpy().copy())
