"""The decoder over a KV cache that is allocated once and written in place.

    cache = KVCache(backend, kv_spec, batch, max_length)   # 2 x layers buffers
            [batch, kv_heads, max_length, head_dim], allocated before the first step
    session = DecoderSession(decoder, embed, manifest, batch, max_length)
    session.prefill(rows, visual)         -> logits [B, V] at each row's last token
                                             (token rows, right-padded and embedded here)
    session.step(tokens [B])              -> the next position of every row
    session.step_regressed()              -> the same from each row's last regressed
                                             embedding (Emu2's image regression loop)
    session.extend(rows, visual)          -> more tokens per row (a new chat turn)
    session.embed(ids [B, S], visual)     -> inputs_embeds [B, S, H]: the embedding step
    session.prefill_embeds / extend_embeds / step_embeds: the same from embeddings

The session owns its embedding step (embed.onnx), so a loop reads `session.step(tokens)`
with no backend handed in. Tensors are bound by the names the manifest maps each role to
(`GraphSpec.names`), never by names written here.

The same device buffers are bound as the graph's past inputs and present outputs, so a
step neither reallocates nor copies the cache: the graph writes only the new rows. On the
CPU the lengths, the step's embeddings and the outputs are host arrays bound once too, and
embed.onnx writes straight into the bound step input, so a decode step makes no new
binding at all (a step is ~1 ms; per-call binding and conversion work was a measurable
part of it). Each row keeps its own length (`lengths`): a batch of prompts of different
lengths is right-padded for the prefill and every row then grows from where it ended, at
the positions it would have alone. seqlens_k / total_sequence_length are derived from
those lengths (see emu_edge.export.decoder for the graph side of the contract).

A session is not shared between threads: Pipeline gives each call its own (a pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emu_edge.runtime.manifest import KVSpec, Manifest


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


def embed_ids(backend, spec, ids: np.ndarray, visual: np.ndarray | None, placeholder: int | None) -> np.ndarray:
    """embed.onnx: ids [B, S] (+ visual [N, visual_dim] for the N placeholder positions)
    -> inputs_embeds [B, S, H]."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    check_placeholders(ids, 0 if visual is None else len(visual), placeholder)
    feeds = {spec.name("input_ids"): ids}
    if spec.has("image_embeds"):
        name = spec.name("image_embeds")
        if visual is None:
            # No placeholder tokens: an empty [0, visual_dim] block (onnxruntime takes 0-sized dims).
            visual = np.zeros([0, backend.input_shapes[name][1]], np.float32)
        feeds[name] = np.ascontiguousarray(visual, dtype=np.float32)
    elif visual is not None:
        raise ValueError("this bundle's embed graph takes no visual embeddings (a text-only bundle)")
    out = spec.name("inputs_embeds")
    return backend.run(feeds, [out])[out]


def check_placeholders(ids: np.ndarray, given: int, placeholder: int | None) -> None:
    """Every placeholder id in `ids` needs one of the `given` visual embeddings."""
    found = int((ids == placeholder).sum()) if placeholder is not None else 0
    if found != given:
        raise ValueError(f"{found} image placeholder token(s) (id {placeholder}) but {given} image "
                         f"embedding(s); pass images as items (generate_text, generate_image), not their "
                         f"placeholder ids")


class DecoderSession:
    """Runs decoder.onnx (and embed.onnx for its inputs) over one KVCache through an
    IOBinding set up once."""

    def __init__(self, decoder, embed, manifest: Manifest, batch: int, max_length: int):
        self.backend, self.embed_backend = decoder, embed
        self.spec, self.embed_spec = manifest.role("decoder"), manifest.role("embed")
        self.model = model = manifest.model
        self.placeholder = model.prompt.placeholder_id if model.prompt is not None else None
        self.cache = KVCache(decoder, model.kv, batch, max_length)
        self.batch, self.max_length = batch, max_length
        name = self.spec.name
        self._names = {key: name(key) for key in ("inputs_embeds", "seqlens_k", "total_sequence_length", "logits")}
        self.binding = decoder.bind()
        for i, (key, value) in enumerate(self.cache.buffers):
            # Same buffer in and out: the graph writes the new rows into it in place.
            self.binding.bind_ortvalue_input(name("past_key", i), key)
            self.binding.bind_ortvalue_output(name("present_key", i), key)
            self.binding.bind_ortvalue_input(name("past_value", i), value)
            self.binding.bind_ortvalue_output(name("present_value", i), value)
        # On the CPU every small input and output is a host array bound once: a call writes
        # the lengths and the step's embeddings into them and reads the outputs from them,
        # with no OrtValue made, bound or converted per token. Elsewhere (CUDA, TensorRT)
        # inputs are bound per call and outputs copied back from the device.
        self._host = decoder.device == "cpu"
        self._seqlens_k = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._step_embeds = np.zeros((batch, 1, model.hidden_size), np.float32)
        self._step_bound = False   # whether inputs_embeds is bound to _step_embeds
        self.logits, self._logits_host = self._output("logits", [batch, model.vocab_size])
        self.regressed, self._regressed_host = None, None
        if self.spec.has("regressed"):
            visual_dim = decoder.output_shapes[name("regressed")][1]
            self.regressed, self._regressed_host = self._output("regressed", [batch, visual_dim])
        if self._host:
            for key, array in (("seqlens_k", self._seqlens_k), ("total_sequence_length", self._total)):
                self.binding.bind_ortvalue_input(self._names[key], self._wrap(array))
            self._step_value = self._wrap(self._step_embeds)
        self._step_ids = np.zeros((batch, 1), np.int64)
        self._image_ids = np.zeros((batch, 1), np.int64)
        self._embed_bindings: dict = {}   # kind -> IOBinding of embed.onnx into _step_embeds
        self._longest = 0            # the longest row's length (cache.lengths.max())
        # Whether embed.onnx can run bound into the step input: both graphs on the CPU.
        self._bound_embed = self._host and embed.device == "cpu"

    def _wrap(self, array: np.ndarray):
        """An OrtValue over `array`'s memory (CPU): writes to the array are what the graph reads."""
        from emu_edge.runtime.backends import import_onnxruntime

        return import_onnxruntime().OrtValue.ortvalue_from_numpy(array)

    def _output(self, key: str, shape: list) -> tuple:
        """(the bound buffer, its host array on the CPU or None)."""
        if self._host:
            host = np.zeros(shape, np.float32)
            buffer = self._wrap(host)
        else:
            host, buffer = None, self.backend.allocate(shape, np.float32)
        self.binding.bind_ortvalue_output(self.spec.name(key), buffer)
        return buffer, host

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths.copy()

    def reset(self) -> None:
        self.cache.reset()
        self._longest = 0

    # -- token ids in --------------------------------------------------------------------

    def embed(self, ids: np.ndarray, visual: np.ndarray | None = None) -> np.ndarray:
        """The embedding step: ids [B, S] (+ visual [N, visual_dim] for the N placeholder
        positions, rows in order) -> inputs_embeds [B, S, H]."""
        return embed_ids(self.embed_backend, self.embed_spec, ids, visual, self.placeholder)

    def prefill(self, rows: list[list[int]], visual: np.ndarray | None = None) -> DecoderOutput:
        """Start over with one prompt per row (right-padded; each row keeps its length).
        visual: the embeddings of every placeholder position, rows in order ([M, visual_dim])."""
        if len(rows) != self.batch:
            raise DecoderError(f"this session holds {self.batch} row(s); got {len(rows)} prompt(s)")
        lengths = [len(r) for r in rows]
        ids = np.full((len(rows), max(lengths)), self.model.pad_token_id or 0, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        return self.prefill_embeds(self.embed(ids, visual), lengths)

    def extend(self, rows, visual: np.ndarray | None = None) -> DecoderOutput:
        """Append the same number of tokens to every row of a filled cache (the next turn
        of a conversation); rows: [B, S] ids."""
        return self.extend_embeds(self.embed(np.asarray(rows, dtype=np.int64), visual))

    def step(self, tokens, check: bool = True) -> DecoderOutput:
        """One token id per row (tokens [B] or [B, 1]). On the CPU embed.onnx writes straight
        into the bound step input, so a token costs two bound graph runs and a copy of the
        logits. check=False skips the checks (the text loop's own tokens: a [B] int array
        without placeholders, which it never samples)."""
        if check:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if tokens.shape != (self.batch,):
                raise DecoderError(f"step() takes one token id per row ({self.batch}), got {tokens.size}")
            check_placeholders(tokens, 0, self.placeholder)
        # Unchecked, `tokens` is the sampler's [B] int array: a decode step is short enough
        # that a conversion and a comparison per token show.
        if not (self._bound_embed and self._longest > 0):
            return self.step_embeds(self.embed(np.asarray(tokens, dtype=np.int64).reshape(-1, 1)))
        self._step_ids[:, 0] = tokens
        self.embed_backend.run_bound(self._embed_binding_for("text"))
        return self._forward(self._step_embeds, 1)

    def step_regressed(self) -> DecoderOutput:
        """One more position per row whose input is a placeholder token carrying that row's
        last regressed embedding: Emu2's regression loop. On the CPU embed.onnx reads the
        bound `regressed` output and writes the bound step input, so nothing is copied
        between the two graphs."""
        if self.regressed is None:
            raise DecoderError("this decoder has no regression head (no 'regressed' output)")
        if self._longest == 0:
            raise DecoderError("step_regressed() continues a filled cache: prefill first")
        if not self._bound_embed or not self.embed_spec.has("image_embeds"):
            # embed() has read `last` before the next decoder run overwrites it: no copy needed.
            last = self._regressed_host if self._host else self.regressed.numpy()
            return self.step_embeds(self.embed(np.full((self.batch, 1), self.placeholder, np.int64), last))
        self._image_ids[:] = self.placeholder
        self.embed_backend.run_bound(self._embed_binding_for("image"))
        return self._forward(self._step_embeds, 1)

    def _embed_binding_for(self, kind: str):
        """embed.onnx's IOBinding into the step input, made once per kind: "text" reads
        _step_ids and no visual embeddings, "image" reads _image_ids and the decoder's bound
        regressed output."""
        binding = self._embed_bindings.get(kind)
        if binding is None:
            spec, backend = self.embed_spec, self.embed_backend
            binding = backend.bind()
            ids = self._step_ids if kind == "text" else self._image_ids
            binding.bind_ortvalue_input(spec.name("input_ids"), self._wrap(ids))
            if kind == "image":
                binding.bind_ortvalue_input(spec.name("image_embeds"), self.regressed)
            elif spec.has("image_embeds"):
                # Text tokens: no visual embeddings to splice in (0 rows, as embed() feeds).
                none = np.zeros([0, backend.input_shapes[spec.name("image_embeds")][1]], np.float32)
                binding.bind_ortvalue_input(spec.name("image_embeds"), self._wrap(none))
            binding.bind_ortvalue_output(spec.name("inputs_embeds"), self._step_value)
            self._embed_bindings[kind] = binding
        return binding

    # -- embeddings in -------------------------------------------------------------------

    def prefill_embeds(self, inputs_embeds: np.ndarray, lengths=None) -> DecoderOutput:
        """Start over with a (right-padded) batch of prompts; lengths[b] real tokens in row b."""
        embeds = self._check_embeds(inputs_embeds)
        counts = np.full(self.batch, embeds.shape[1], np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if counts.shape != (self.batch,) or counts.min() < 1 or counts.max() > embeds.shape[1]:
            raise DecoderError(f"lengths must give 1..{embeds.shape[1]} tokens for each of the {self.batch} "
                               f"rows, got {counts.tolist()}")
        self.reset()
        # Padding past the longest row would make the graph take this for a continuation.
        return self._forward(embeds[:, : int(counts.max())], counts)

    def extend_embeds(self, inputs_embeds: np.ndarray) -> DecoderOutput:
        """Append S positions to every row (the next turn of a conversation, or one step)."""
        embeds = self._check_embeds(inputs_embeds)
        if self._longest == 0:
            return self.prefill_embeds(embeds)
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

    def step_embeds(self, inputs_embeds: np.ndarray) -> DecoderOutput:
        embeds = self._check_embeds(inputs_embeds)
        if embeds.shape[1] != 1:
            raise DecoderError(f"step_embeds() takes one position per row, got {embeds.shape[1]}; use extend_embeds()")
        return self.extend_embeds(embeds)

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
                self.binding.bind_ortvalue_input(self._names["inputs_embeds"], self._step_value)
                self._step_bound = True
        else:
            self.binding.bind_cpu_input(self._names["inputs_embeds"], np.ascontiguousarray(embeds))
            self._step_bound = False
            if not self._host:
                self.binding.bind_cpu_input(self._names["seqlens_k"], self._seqlens_k)
                self.binding.bind_cpu_input(self._names["total_sequence_length"], self._total)
        self.backend.run_bound(self.binding)
        lengths[:] = totals
        self._longest = longest
        # Copies: the bound outputs are overwritten by the next call.
        if self._host:
            return DecoderOutput(logits=self._logits_host.copy(),
                                 regressed=None if self._regressed_host is None else self._regressed_host.copy())
        return DecoderOutput(logits=self.logits.numpy().copy(),
                             regressed=None if self.regressed is None else self.regressed.numpy().copy())
