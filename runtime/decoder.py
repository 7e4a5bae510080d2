"""The decoder over a KV cache that is allocated once and written in place.

    cache = KVCache(backend, kv_spec, batch, max_length)   # 2 x layers buffers
            [batch, kv_heads, max_length, head_dim], allocated before the first step
    session = DecoderSession(decoder, manifest, batch, max_length)
    session.prefill(rows, visual)         -> logits [B, V] at each row's last token
                                             (token rows, right-padded here)
    session.step(tokens [B])              -> the next position of every row
    session.step_regressed()              -> the same from each row's last regressed
                                             embedding (Emu2's image regression loop)
    session.extend(rows, visual)          -> more tokens per row (a new chat turn)

    # rows of one cache joining and leaving at step boundaries (a server's running batch):
    session.prefill_row(b, ids, visual)   -> logits [1, V]; row b alone, the others untouched
    session.step(tokens [k], rows=k)      -> the first k rows only; rows from k on do not run
    session.free_row(b)                   -> row b holds nothing (kept empty if stepped)

The decoder graph takes token ids and holds the embedding table (emu2: and splices visual
embeddings in at the image token's positions), so every call is one graph run. Tensors are
bound by the names the manifest maps each role to (`GraphSpec.names`), never by names
written here.

The same device buffers are bound as the graph's past inputs and present outputs, so a
step neither reallocates nor copies the cache: the graph writes only the new rows. On the
CPU the lengths, the step's token ids and the outputs are host arrays bound once too, so a
decode step makes no new binding at all (a step of a small decoder is ~0.1 ms; per-call
binding and conversion work was a measurable part of it). During regression the
`regressed` output buffer is bound as the next step's `image_embeds` input: the graph
reads it in its first node and writes it in its last, so nothing is copied between steps.
Each row keeps its own length (`lengths`): a batch of prompts of different lengths is
right-padded for the prefill and every row then grows from where it ended, at the
positions it would have alone. seqlens_k / total_sequence_length are derived from those
lengths (see emu_edge.export.decoder for the graph side of the contract).

A range of rows [lo, hi) is a batch of its own: row b of every [B, ...] buffer starts b
rows into it, so a second binding over that part of each buffer (by address) runs those
rows alone. prefill_row runs one row that way: onnxruntime's GroupQueryAttention takes
several new tokens on a non-empty cache only for batch 1, and that is what the one-row
binding is; its cache lands in place, so nothing is copied. step(rows=k) runs the first k
rows, so a batch whose last rows are free costs what a batch of k costs (a step of 16 rows
of the shipped model costs 6-7x a step of 1).

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
class _Rows:
    """A binding over rows [lo, hi) of a session, and its views of the host arrays."""

    binding: object
    lo: int
    hi: int
    lengths: np.ndarray               # views of the session's arrays, rows [lo, hi)
    seqlens_k: np.ndarray
    step_ids: np.ndarray
    logits_host: np.ndarray | None
    regressed_host: np.ndarray | None
    step_values: dict | None = None   # CPU: the step inputs bound once, by kind
    bound: str | None = None          # which of them are bound: "text", "image" or None


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


def check_placeholders(ids: np.ndarray, given: int, placeholder: int | None) -> None:
    """Every placeholder id in `ids` needs one of the `given` visual embeddings."""
    found = int((ids == placeholder).sum()) if placeholder is not None else 0
    if found != given:
        raise ValueError(f"{found} image placeholder token(s) (id {placeholder}) but {given} image "
                         f"embedding(s); pass images as items (generate_text, generate_image), not their "
                         f"placeholder ids")


class DecoderSession:
    """Runs decoder.onnx over one KVCache through an IOBinding set up once."""

    def __init__(self, decoder, manifest: Manifest, batch: int, max_length: int):
        self.backend = decoder
        self.spec = manifest.role("decoder")
        self.model = model = manifest.model
        self.placeholder = model.prompt.placeholder_id if model.prompt is not None else None
        self.cache = KVCache(decoder, model.kv, batch, max_length)
        self.batch, self.max_length = batch, max_length
        name = self.spec.name
        self._names = {key: name(key) for key in ("input_ids", "seqlens_k", "total_sequence_length", "logits")}
        self._visual_name = name("image_embeds") if self.spec.has("image_embeds") else None
        self.binding = decoder.bind()
        for i, (key, value) in enumerate(self.cache.buffers):
            # Same buffer in and out: the graph writes the new rows into it in place.
            self.binding.bind_ortvalue_input(name("past_key", i), key)
            self.binding.bind_ortvalue_output(name("present_key", i), key)
            self.binding.bind_ortvalue_input(name("past_value", i), value)
            self.binding.bind_ortvalue_output(name("present_value", i), value)
        # On the CPU every small input and output is a host array bound once: a call writes
        # the lengths and the step's ids into them and reads the outputs from them, with no
        # OrtValue made, bound or converted per token. Elsewhere (CUDA, TensorRT) inputs are
        # bound per call and outputs copied back from the device.
        self._host = decoder.device == "cpu"
        self._seqlens_k = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self.logits, self._logits_host = self._output("logits", [batch, model.vocab_size])
        self.regressed, self._regressed_host, self._regressed_dim = None, None, None
        if self.spec.has("regressed"):
            self._regressed_dim = decoder.output_shapes[name("regressed")][1]
            self.regressed, self._regressed_host = self._output("regressed", [batch, self._regressed_dim])
        self._no_visual = None
        if self._visual_name is not None:
            # Text positions: no visual embeddings to splice in (0 rows).
            self._no_visual = np.zeros([0, decoder.input_shapes[self._visual_name][1]], np.float32)
        self._step_ids = np.zeros((batch, 1), np.int64)
        self._image_ids = np.full((batch, 1), -1 if self.placeholder is None else self.placeholder, np.int64)
        step_values = None
        if self._host:
            for key, array in (("seqlens_k", self._seqlens_k), ("total_sequence_length", self._total)):
                self.binding.bind_ortvalue_input(self._names[key], self._wrap(array))
            step_values = {"text": (self._wrap(self._step_ids), self._wrap_visual(self._no_visual)),
                           "image": (self._wrap(self._image_ids), self.regressed)}
        self._all = _Rows(self.binding, 0, batch, self.cache.lengths, self._seqlens_k, self._step_ids,
                          self._logits_host, self._regressed_host, step_values)
        self._views: dict[tuple[int, int], _Rows] = {}   # other row ranges, bound on first use
        self._free = np.zeros(0, np.int64)   # rows free_row emptied and nothing has filled since
        self._longest = 0            # the longest row's length (cache.lengths.max())

    def _wrap(self, array: np.ndarray):
        """An OrtValue over `array`'s memory (CPU): writes to the array are what the graph reads."""
        from emu_edge.runtime.backends import import_onnxruntime

        return import_onnxruntime().OrtValue.ortvalue_from_numpy(array)

    def _wrap_visual(self, array):
        return None if array is None else self._wrap(array)

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
        self._free = self._free[:0]
        self._longest = 0

    def prefill(self, rows: list[list[int]], visual: np.ndarray | None = None) -> DecoderOutput:
        """Start over with one prompt per row (right-padded; each row keeps its length).
        visual: the embeddings of every placeholder position, rows in order ([M, visual_dim])."""
        if len(rows) != self.batch:
            raise DecoderError(f"this session holds {self.batch} row(s); got {len(rows)} prompt(s)")
        lengths = [len(r) for r in rows]
        if min(lengths) < 1:
            raise DecoderError(f"every row needs at least one token, got lengths {lengths}")
        ids = np.full((len(rows), max(lengths)), self.model.pad_token_id or 0, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        self._check_visual(ids, visual)
        self.reset()
        return self._forward(ids, np.asarray(lengths, np.int64), visual)

    def extend(self, rows, visual: np.ndarray | None = None) -> DecoderOutput:
        """Append the same number of tokens to every row of a filled cache (the next turn
        of a conversation); rows: [B, S] ids."""
        ids = np.asarray(rows, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            raise DecoderError(f"extend() takes [{self.batch}, S >= 1] token ids, got shape {list(ids.shape)}")
        if self._longest == 0:
            return self.prefill(ids.tolist(), visual)   # which checks the visual embeddings
        self._check_visual(ids, visual)
        steps = ids.shape[1]
        self._check_room(self.cache.lengths + steps)
        if steps > 1 and self.batch > 1:
            # GroupQueryAttention takes several new tokens on a non-empty cache only for
            # batch 1; one token at a time is the same computation for every row.
            spans = self._visual_spans(ids, visual)
            out = None
            for s in range(steps):
                out = self._forward(ids[:, s : s + 1], 1, spans[s])
            return out
        return self._forward(ids, steps, visual)

    def step(self, tokens, check: bool = True, rows: int | None = None) -> DecoderOutput:
        """One token id per row (tokens [B] or [B, 1]): one bound graph run and a copy of
        the logits on the CPU. check=False skips the checks (the text loop's own tokens: a
        [B] int array without placeholders, which it never samples). rows=k: only the
        first k rows run (tokens [k], logits [k, V]); the others keep their cache and
        length, whatever they hold."""
        if rows is not None and not 1 <= rows <= self.batch:
            raise DecoderError(f"rows must be in 1..{self.batch}, got {rows}")
        part = self._all if rows is None else self._rows(0, rows)
        if check:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if tokens.shape != (part.hi,):
                raise DecoderError(f"step() takes one token id per row ({part.hi}), got {tokens.size}")
            check_placeholders(tokens, 0, self.placeholder)
        # Unchecked, `tokens` is the sampler's [B] int array: a decode step is short enough
        # that a conversion and a comparison per token show.
        part.step_ids[:, 0] = tokens
        return self._forward(part.step_ids, 1, self._no_visual, "text", part)

    def prefill_row(self, b: int, ids: list[int], visual: np.ndarray | None = None) -> DecoderOutput:
        """Start row b over with one prompt, run alone (batch 1, as the prompt runs alone in
        a session of its own): the other rows' caches and lengths are untouched, so a
        request joins a running batch here and the next step() carries it with the others.
        -> the logits of its last token, [1, V]."""
        if not 0 <= b < self.batch:
            raise DecoderError(f"row {b} is not one of this session's {self.batch} rows")
        row = np.asarray([ids], dtype=np.int64)
        if row.ndim != 2 or row.shape[1] < 1:
            raise DecoderError(f"prefill_row() takes a list of >= 1 token ids, got shape {list(row.shape)}")
        self._check_visual(row, visual)
        part = self._rows(b, b + 1)
        part.lengths[0] = 0
        self._free = self._free[self._free != b]
        return self._forward(row, row.shape[1], visual, None, part)

    def free_row(self, b: int) -> None:
        """Row b holds nothing from now on (its request has ended) and the others are
        untouched. A free row that a step still runs (one below a busy row) is fed the
        token given for it at position 0 and left empty again, so it never fills up and
        never reads what it held."""
        if not 0 <= b < self.batch:
            raise DecoderError(f"row {b} is not one of this session's {self.batch} rows")
        self.cache.lengths[b] = 0
        self._free = np.union1d(self._free, [b])
        self._longest = int(self.cache.lengths.max())

    def step_regressed(self) -> DecoderOutput:
        """One more position per row whose input is a placeholder token carrying that row's
        last regressed embedding: Emu2's regression loop."""
        if self.regressed is None or self._visual_name is None:
            raise DecoderError("this decoder has no regression head (no 'regressed' output)")
        if self._longest == 0:
            raise DecoderError("step_regressed() continues a filled cache: prefill first")
        # Off the CPU the last output is copied back and fed as a host input.
        last = None if self._host else self.regressed.numpy()
        return self._forward(self._image_ids, 1, last, "image")

    def _check_visual(self, ids: np.ndarray, visual: np.ndarray | None) -> None:
        check_placeholders(ids, 0 if visual is None else len(visual), self.placeholder)
        if visual is not None and self._visual_name is None:
            raise ValueError("this bundle's decoder takes no visual embeddings (a text-only bundle)")

    def _visual_spans(self, ids: np.ndarray, visual: np.ndarray | None) -> list:
        """The visual embeddings of each column of `ids` (rows in order), for feeding a
        [B, S] block one column at a time."""
        if visual is None:
            return [None] * ids.shape[1]
        # Placeholders are numbered row-major; column s takes those in column s.
        is_image = ids == self.placeholder
        order = np.cumsum(is_image.reshape(-1)).reshape(ids.shape) - 1
        return [visual[order[is_image[:, s], s]] if is_image[:, s].any() else None for s in range(ids.shape[1])]

    def _rows(self, lo: int, hi: int) -> _Rows:
        """Rows [lo, hi) as a batch of their own: a binding over that part of every buffer,
        made on first use (onnxruntime's IOBinding binds a buffer by its address)."""
        part = self._all if (lo, hi) == (0, self.batch) else self._views.get((lo, hi))
        if part is not None:
            return part
        binding = self.backend.bind()
        if not hasattr(binding, "bind_input"):
            raise DecoderError("running some rows of a batch alone needs the onnxruntime backend (its IOBinding "
                               "binds part of a buffer by address)")
        device, device_id = self.backend.device, self.backend.device_id

        def bind(key: str, buffer, row_shape: list, dtype, output: bool) -> None:
            row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
            address = buffer.data_ptr() + lo * row_bytes
            (binding.bind_output if output else binding.bind_input)(key, device, device_id, dtype,
                                                                    [hi - lo, *row_shape], address)

        name, kv = self.spec.name, self.cache.spec
        row_shape = [kv.num_kv_heads, self.max_length, kv.head_dim]
        for i, (key, value) in enumerate(self.cache.buffers):
            for role, buffer in (("key", key), ("value", value)):
                bind(name(f"past_{role}", i), buffer, row_shape, np.dtype(kv.dtype), False)
                bind(name(f"present_{role}", i), buffer, row_shape, np.dtype(kv.dtype), True)
        host = self._host
        logits_host = self._logits_host[lo:hi] if host else None
        regressed_host = self._regressed_host[lo:hi] if host and self.regressed is not None else None
        if host:
            binding.bind_ortvalue_output(self._names["logits"], self._wrap(logits_host))
            if regressed_host is not None:
                binding.bind_ortvalue_output(name("regressed"), self._wrap(regressed_host))
        else:
            bind(self._names["logits"], self.logits, [self.model.vocab_size], np.float32, True)
            if self.regressed is not None:
                bind(name("regressed"), self.regressed, [self._regressed_dim], np.float32, True)
        part = _Rows(binding, lo, hi, self.cache.lengths[lo:hi], self._seqlens_k[lo:hi], self._step_ids[lo:hi],
                     logits_host, regressed_host)
        if host:
            binding.bind_ortvalue_input(self._names["seqlens_k"], self._wrap(part.seqlens_k))
            binding.bind_ortvalue_input(self._names["total_sequence_length"], self._wrap(self._total))
            part.step_values = {"text": (self._wrap(part.step_ids), self._wrap_visual(self._no_visual))}
        self._views[(lo, hi)] = part
        return part

    def _check_room(self, totals: np.ndarray) -> None:
        if totals.max() > self.max_length:
            raise ContextTooLongError(
                f"the context would grow to {int(totals.max())} tokens, beyond max_length {self.max_length}. "
                f"Start a new conversation, shorten the prompt or max_new_tokens, or load with a larger "
                f"max_length (this bundle's decoder supports up to {self.model.max_length}).")

    def _forward(self, ids: np.ndarray, counts, visual: np.ndarray | None, bound: str | None = None,
                 part: _Rows | None = None) -> DecoderOutput:
        """Run the graph on S new positions per row; counts: real tokens per row ([B] or one
        int). bound: "text" / "image" when `ids` is that kind's host array, bound once.
        part: the rows that run (default all)."""
        part = part or self._all
        whole = part is self._all
        lengths = part.lengths
        if bound is not None:
            # One more token in every row: the longest row is known without a reduction, and
            # seqlens_k (tokens after the call - 1) is the lengths before it. A decode step is
            # short enough that each numpy call shows.
            totals = None
            longest = (self._longest if whole else int(lengths.max())) + 1
            if longest > self.max_length:
                self._check_room(lengths + 1)
            part.seqlens_k[:] = lengths
        else:
            totals = lengths + counts
            longest = int(totals.max())
            if longest > self.max_length:
                self._check_room(totals)
            np.subtract(totals, 1, out=part.seqlens_k, casting="unsafe")
        self._total[()] = longest
        binding = part.binding
        if bound is not None and self._host:
            if part.bound != bound:
                ids_value, visual_value = part.step_values[bound]
                binding.bind_ortvalue_input(self._names["input_ids"], ids_value)
                if self._visual_name is not None:
                    binding.bind_ortvalue_input(self._visual_name, visual_value)
                part.bound = bound
        else:
            binding.bind_cpu_input(self._names["input_ids"], np.ascontiguousarray(ids, dtype=np.int64))
            if self._visual_name is not None:
                binding.bind_cpu_input(self._visual_name, self._no_visual if visual is None
                                       else np.ascontiguousarray(visual, dtype=np.float32))
            part.bound = None
            if not self._host:
                binding.bind_cpu_input(self._names["seqlens_k"], part.seqlens_k)
                binding.bind_cpu_input(self._names["total_sequence_length"], self._total)
        self.backend.run_bound(binding)
        if totals is None:
            lengths += 1
        else:
            lengths[:] = totals
        if self._free.size:
            # Free rows that ran wrote position 0 only: left empty, they never fill up.
            self.cache.lengths[self._free] = 0
        self._longest = longest if whole else int(self.cache.lengths.max())
        # Copies: the bound outputs are overwritten by the next call.
        if self._host:
            return DecoderOutput(logits=part.logits_host.copy(),
                                 regressed=None if part.regressed_host is None else part.regressed_host.copy())
        return DecoderOutput(logits=self.logits.numpy()[part.lo:part.hi].copy(),
                             regressed=None if self.regressed is None
                             else self.regressed.numpy()[part.lo:part.hi].copy())
