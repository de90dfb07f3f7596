"""Batched forward passes over a KV cache: prefill new sequences, step all of them.

A decoder holds the KV cache of every sequence in the running batch, keyed by an opaque
handle. ``admit`` prefills new sequences (their KV joins the batch), ``step`` feeds one
token per sequence in a single forward pass, ``release`` frees a row. Both return the
last-position logits of each sequence, as numpy rows. Not thread-safe: one engine thread
owns a decoder.

* ``GenaiDecoder`` (GroupQueryAttention, genai layout): one static buffer per layer of shape
  ``[max_batch, kv_heads, max_length, head_dim]``, allocated once. Live sequences occupy rows
  ``0..n-1``; a forward pass binds the row range as both past and present (GQA writes the new
  keys in place at each row's own length, read from the attention mask), so nothing is
  copied per step. A released row is refilled by moving the last row into it (only its
  valid prefix is copied).
* ``OptimumDecoder`` (explicit positions, growing past): the model concatenates past and
  new keys itself and returns a fresh present, so the presents of one step are bound as the
  pasts of the next (no copy; onnxruntime's arena recycles the memory). Rows are
  left-padded to the longest; joins and leaves rebuild the cache once.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes.onnx.layout import ModelLayout

Handle = Hashable


class _BatchDecoder:
    """What both layouts share: the session, the batch's rows and their cache lengths."""

    def __init__(
        self,
        session: ort.InferenceSession,
        layout: ModelLayout,
        max_batch: int,
        max_length: int,
        prefill_chunk: int = 512,
    ) -> None:
        self.session, self.layout = session, layout
        self.max_batch, self.max_length = max_batch, max_length
        self.chunk = prefill_chunk
        self.rows: list[Handle] = []
        self.lens: list[int] = []  # tokens in each row's cache

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)


class GenaiDecoder(_BatchDecoder):
    """Continuous-batching decoder for genai-layout (GQA, shared buffer) models."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layout, max_batch, max_length = self.layout, self.max_batch, self.max_length
        shape = (max_batch, layout.kv_heads, max_length, layout.head_dim)
        self.buffers = [np.zeros(shape, layout.kv_dtype) for _ in layout.past_names]
        self.history: list[list[int]] = []  # only kept for LongRoPE re-prefill
        self.n_short = 0  # LongRoPE: rows[:n_short] use short factors, the rest long
        self.threshold = layout.longrope_threshold
        if self.threshold is not None and self.threshold >= max_length:
            self.threshold = None  # the long side is never reached
        self._bindings: dict[tuple[int, int, bool], ort.IOBinding] = {}
        # decode steps write their ids into, and read their logits from, buffers bound once
        self._ids = np.zeros((max_batch, 1), np.int64)
        self._logits = np.zeros((max_batch, 1, layout.vocab_size), layout.logits_dtype)

    def admit(self, items: list[tuple[Handle, list[int]]]) -> dict[Handle, np.ndarray]:
        """Prefill new sequences; right-padded together when short, else one by one."""
        out: dict[Handle, np.ndarray] = {}
        if len(items) > 1 and self._batchable(items):
            start = len(self.rows)
            for handle, ids in items:
                self._append(handle, ids, long=False)
            logits = self._prefill_batch(start, [ids for _, ids in items])
            out.update(zip([h for h, _ in items], logits, strict=True))
            return out
        for handle, ids in items:
            long = self.threshold is not None and len(ids) > self.threshold
            row = self._append(handle, ids, long)
            out[handle] = self._prefill_row(row, ids, long)
        return out

    def step(self, tokens: dict[Handle, int]) -> dict[Handle, np.ndarray]:
        """Feed each live sequence its next token; return next-token logits per sequence.

        The rows returned are views into a buffer reused by the next call.
        """
        out: dict[Handle, np.ndarray] = {}
        if self.threshold is not None:
            self._cross_longrope(tokens, out)
        groups = [(0, self.n_short, False), (self.n_short, len(self.rows), True)]
        for start, stop, long in groups:
            live = [r for r in range(start, stop) if self.rows[r] not in out]
            if not live:
                continue
            start = live[0]  # rows re-prefilled this step sit at the front of the long group
            self._ids[start:stop, 0] = [tokens[self.rows[r]] for r in range(start, stop)]
            lens = np.array(self.lens[start:stop]) + 1
            width = int(lens.max()) if not long else max(int(lens.max()), self.threshold + 1)
            mask = (np.arange(width) < lens[:, None]).astype(self.layout.mask_dtype)
            io = self._binding(start, stop, decode=True)
            io.bind_cpu_input(self.layout.attention_mask, mask)
            self.session.run_with_iobinding(io)
            for r in range(start, stop):
                self.lens[r] += 1
                if self.threshold is not None:
                    self.history[r].append(tokens[self.rows[r]])
                out[self.rows[r]] = self._logits[r, -1]
        return out

    def release(self, handle: Handle) -> None:
        """Drop a sequence; the last row of its group moves into its place."""
        row = self.rows.index(handle)
        if row < self.n_short:
            self._move(self.n_short - 1, row)
            self.n_short -= 1
            row = self.n_short
        self._move(len(self.rows) - 1, row)
        for seq in (self.rows, self.lens, self.history):
            seq.pop()

    # --- LongRoPE ----------------------------------------------------------------------------

    def _cross_longrope(self, tokens: dict[Handle, int], out: dict[Handle, np.ndarray]) -> None:
        """Re-prefill, with the long factors, every short row whose next step crosses over."""
        for row in range(self.n_short - 1, -1, -1):
            if self.lens[row] + 1 <= self.threshold:
                continue
            handle = self.rows[row]
            self._swap_keep(row, self.n_short - 1)
            self.n_short -= 1
            ids = self.history[self.n_short] + [tokens[handle]]
            self.history[self.n_short] = ids
            self.lens[self.n_short] = 0
            out[handle] = self._prefill_row(self.n_short, ids, long=True)

    def _swap_keep(self, a: int, b: int) -> None:
        """Swap rows a and b, copying only b's cache: a's is about to be rewritten."""
        if a == b:
            return
        self._copy_kv(b, a)
        for seq in (self.rows, self.lens, self.history):
            seq[a], seq[b] = seq[b], seq[a]

    # --- rows --------------------------------------------------------------------------------

    def _batchable(self, items: list[tuple[Handle, list[int]]]) -> bool:
        longest = max(len(ids) for _, ids in items)
        short = self.threshold is None or longest <= self.threshold
        return longest <= self.chunk and short and self.n_short == len(self.rows)

    def _append(self, handle: Handle, ids: list[int], long: bool) -> int:
        """Give a new sequence a row at the end of its LongRoPE group; return the row."""
        self.rows.append(handle)
        self.lens.append(0)
        self.history.append(list(ids) if self.threshold is not None else [])
        row = len(self.rows) - 1
        if long:
            return row
        self._swap_keep(row, self.n_short)  # the first long row moves to the end
        self.n_short += 1
        return self.n_short - 1

    def _move(self, src: int, dst: int) -> None:
        """Put row src (cache and bookkeeping) into row dst."""
        if src == dst:
            return
        self._copy_kv(src, dst)
        self.rows[dst], self.lens[dst], self.history[dst] = (
            self.rows[src],
            self.lens[src],
            self.history[src],
        )

    def _copy_kv(self, src: int, dst: int) -> None:
        n = self.lens[src]
        for buf in self.buffers:
            buf[dst, :, :n] = buf[src, :, :n]

    # --- forward passes ----------------------------------------------------------------------

    def _prefill_row(self, row: int, ids: list[int], long: bool) -> np.ndarray:
        """Prefill one row in chunks; GQA appends each chunk at the row's current length."""
        logits = None
        for lo in range(0, len(ids), self.chunk):
            chunk = ids[lo : lo + self.chunk]
            end = lo + len(chunk)
            width = max(end, self.threshold + 1) if long else end
            mask = np.zeros((1, width), self.layout.mask_dtype)
            mask[0, :end] = 1
            logits = self._run(row, row + 1, np.array([chunk], np.int64), mask)
            self.lens[row] = end
        return logits[0, -1].copy()

    def _prefill_batch(self, start: int, prompts: list[list[int]]) -> list[np.ndarray]:
        """Prefill rows start.. together, right-padded; positions come from the mask."""
        lens = np.array([len(p) for p in prompts])
        ids = np.full((len(prompts), int(lens.max())), self.layout.pad_id, np.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        mask = (np.arange(ids.shape[1]) < lens[:, None]).astype(self.layout.mask_dtype)
        logits = self._run(start, start + len(prompts), ids, mask)
        for i, n in enumerate(lens):
            self.lens[start + i] = int(n)
        return [logits[i, n - 1] for i, n in enumerate(lens)]

    def _run(self, start: int, stop: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        io = self._binding(start, stop)
        io.bind_cpu_input(self.layout.input_ids, ids)
        io.bind_cpu_input(self.layout.attention_mask, mask)
        io.bind_output(self.layout.logits, "cpu")
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def _binding(self, start: int, stop: int, decode: bool = False) -> ort.IOBinding:
        """An IOBinding with rows start..stop of every KV buffer bound as past and present.

        A decode binding also has its ids and logits bound to rows of the step buffers.
        """
        io = self._bindings.get((start, stop, decode))
        if io is None:
            io = self.session.io_binding()
            if decode:
                ids = ort.OrtValue.ortvalue_from_numpy(self._ids[start:stop])  # shares memory
                io.bind_ortvalue_input(self.layout.input_ids, ids)
                logits = ort.OrtValue.ortvalue_from_numpy(self._logits[start:stop])
                io.bind_ortvalue_output(self.layout.logits, logits)
            else:
                io.bind_output(self.layout.logits, "cpu")  # first: get_outputs()[0] is logits
            names = zip(self.layout.past_names, self.layout.present_names, strict=True)
            for buf, (past, present) in zip(self.buffers, names, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buf[start:stop])
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            self._bindings[(start, stop, decode)] = io
        return io


class OptimumDecoder(_BatchDecoder):
    """Continuous-batching decoder for decoder-with-past models with a growing past."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.past: list[Any] = []  # OrtValues [n, kv_heads, width, head_dim], left-padded

    def admit(self, items: list[tuple[Handle, list[int]]]) -> dict[Handle, np.ndarray]:
        """Prefill new sequences (left-padded together when short), then merge their KV."""
        out: dict[Handle, np.ndarray] = {}
        groups = [items] if max(len(i) for _, i in items) <= self.chunk else [[i] for i in items]
        for group in groups:
            prompts = [ids for _, ids in group]
            past, logits = None, None
            width = max(map(len, prompts))
            for lo in range(0, width, self.chunk):
                hi = min(width, lo + self.chunk)
                # left-pad each prompt to the longest one: its tokens end at column ``width``
                ids = np.full((len(group), hi - lo), self.layout.pad_id, np.int64)
                for i, p in enumerate(prompts):
                    padded = [self.layout.pad_id] * (width - len(p)) + list(p)
                    ids[i] = padded[lo:hi]
                cols = (
                    np.arange(hi)[None, :] >= (width - np.array(list(map(len, prompts))))[:, None]
                )
                mask = cols.astype(self.layout.mask_dtype)
                pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, lo:hi].astype(np.int64)
                logits, past = self._run(ids, mask, pos, past, len(group))
            lens = [len(p) for p in prompts]
            out.update(zip([h for h, _ in group], logits[:, -1], strict=True))
            self._merge([h for h, _ in group], lens, past)
        return out

    def step(self, tokens: dict[Handle, int]) -> dict[Handle, np.ndarray]:
        """Feed each live sequence its next token; return next-token logits per sequence."""
        n = len(self.rows)
        width = max(self.lens)
        lens = np.array(self.lens)
        ids = np.array([[tokens[h]] for h in self.rows], np.int64)
        mask = (np.arange(width + 1)[None, :] >= (width - lens)[:, None]).astype(
            self.layout.mask_dtype
        )
        logits, self.past = self._run(ids, mask, lens[:, None].astype(np.int64), self.past, n)
        self.lens = [length + 1 for length in self.lens]
        return dict(zip(self.rows, logits[:, -1], strict=True))

    def release(self, handle: Handle) -> None:
        """Drop a sequence and trim padding columns no remaining row needs."""
        row = self.rows.index(handle)
        self.rows.pop(row)
        self.lens.pop(row)
        if not self.rows:
            self.past = []
            return
        width = max(self.lens)
        keep = [r for r in range(len(self.rows) + 1) if r != row]
        self.past = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[keep, :, -width:]))
            for v in self.past
        ]

    def _merge(self, handles: list[Handle], lens: list[int], past: list[Any]) -> None:
        """Append prefilled rows to the batch, right-aligning every row's cache."""
        if not self.rows:
            self.rows, self.lens, self.past = list(handles), list(lens), past
            return
        old = [v.numpy() for v in self.past]
        new = [v.numpy() for v in past]
        width = max(old[0].shape[2], new[0].shape[2])
        merged = []
        for a, b in zip(old, new, strict=True):
            shape = (a.shape[0] + b.shape[0], a.shape[1], width, a.shape[3])
            buf = np.zeros(shape, a.dtype)
            buf[: a.shape[0], :, width - a.shape[2] :] = a
            buf[a.shape[0] :, :, width - b.shape[2] :] = b
            merged.append(ort.OrtValue.ortvalue_from_numpy(buf))
        self.rows += handles
        self.lens += lens
        self.past = merged

    def _run(self, ids, mask, pos, past, n):
        io = self.session.io_binding()
        lay = self.layout
        io.bind_cpu_input(lay.input_ids, ids)
        io.bind_cpu_input(lay.attention_mask, mask)
        io.bind_cpu_input(lay.position_ids, pos)
        if not past:
            empty = np.zeros((n, lay.kv_heads, 0, lay.head_dim), lay.kv_dtype)
            past = [ort.OrtValue.ortvalue_from_numpy(empty)] * len(lay.past_names)
        for name, value in zip(lay.past_names, past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output(lay.logits, "cpu")
        for name in lay.present_names:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), list(outs[1:])


def make_decoder(
    session: ort.InferenceSession,
    layout: ModelLayout,
    max_batch: int,
    max_length: int,
    prefill_chunk: int = 512,
) -> GenaiDecoder | OptimumDecoder:
    """The decoder class that fits the model's layout."""
    cls = GenaiDecoder if layout.kind == "genai" else OptimumDecoder
    return cls(session, layout, max_batch, max_length, prefill_chunk)
