"""LM training rows from token streams whose documents end with EOS: packed or padded.

Packed (`PackedRows`): the stream is cut into non-overlapping windows of seq_len + 1 tokens;
a window holds the ends and starts of several documents, so the row carries `segment_ids`
(a new document starts after each EOS) and per-document `positions`, which restrict attention
and RoPE/learned positions to each document. Padded (`PaddedRows`): one document (or one
seq_len chunk of a long one) per row, padded at the end. Both give `mask`, the targets that
count in the loss: not the pair whose input is EOS (its target starts the next document, which
the row must not predict across), not padding, and (chat data) only the tokens the stream's
token mask marks. Random access: `take(indices)` reads a batch of rows in one gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from framework.data.sources import TokenArray


def document_fields(inputs: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
    """segment_ids (from 1), positions and the EOS part of the loss mask of packed rows
    [n, L]: a document starts at column 0 and after each EOS."""
    n, length = inputs.shape
    cols = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))
    if eos_id is None:  # token files without metadata: one document per row, as it comes
        return {
            "segment_ids": np.ones((n, length), np.int32),
            "positions": np.ascontiguousarray(cols),
            "mask": np.ones((n, length), np.float32),
        }
    is_eos = inputs == eos_id
    starts = np.zeros((n, length), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    first = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
    return {
        "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
        "positions": (cols - first).astype(np.int32),
        "mask": (~is_eos).astype(np.float32),
    }


class PackedRows:
    """Non-overlapping windows: row i -> tokens[i*L : i*L + L + 1] of its segment (a file or
    an in-memory stream); windows never cross a segment. `masks` (one per segment, 0/1 per
    token) mark the tokens that may be targets (chat data)."""

    def __init__(
        self,
        segments: Sequence[TokenArray],
        seq_len: int,
        eos_id: int | None,
        masks: Sequence[np.ndarray] | None = None,
    ):
        self.segments, self.seq_len, self.eos_id = list(segments), seq_len, eos_id
        self.masks = None if masks is None else list(masks)
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.segments]
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the rows (each row's last token is the next one's first)."""
        return len(self) * self.seq_len + (1 if len(self) else 0)

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """int32 [n, L+1] windows (and their token masks) for row indices."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((idx.shape[0], self.seq_len + 1), dtype=np.int32)
        mask = None if self.masks is None else np.empty(out.shape, dtype=np.float32)
        seg = np.searchsorted(self._ends, idx, side="right")
        for s in np.unique(seg):
            rows = np.nonzero(seg == s)[0]
            local = idx[rows] - (self._ends[s - 1] if s > 0 else 0)
            where = local[:, None] * self.seq_len + self._offsets
            out[rows] = self.segments[s].data[where]
            if mask is not None:
                mask[rows] = self.masks[s][where]
        return out, mask

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{"inputs", "targets", "segment_ids", "positions", "mask"}: [n, L]; targets are the
        inputs shifted left by one."""
        w, token_mask = self._gather(indices)
        inputs = np.ascontiguousarray(w[:, :-1])
        out = {"inputs": inputs, "targets": np.ascontiguousarray(w[:, 1:])}
        out |= document_fields(inputs, self.eos_id)
        if token_mask is not None:
            out["mask"] *= token_mask[:, 1:]
        return out


class PaddedRows:
    """One document per row, padded at the end (a document longer than seq_len + 1 tokens
    takes several rows, seq_len targets each). Documents are the spans of each segment that
    end with EOS (a trailing span without EOS counts too); empty documents give no row."""

    def __init__(
        self,
        segments: Sequence[TokenArray],
        seq_len: int,
        eos_id: int | None,
        masks: Sequence[np.ndarray] | None = None,
        pad_id: int = 0,
    ):
        self.segments, self.seq_len, self.eos_id = list(segments), seq_len, eos_id
        self.masks = None if masks is None else list(masks)
        self.pad_id = pad_id
        seg_ids, starts, ends = [], [], []  # ends inclusive: the document's EOS
        for s, arr in enumerate(self.segments):
            b, e = self._documents(arr)
            seg_ids.append(np.full(len(b), s, np.int64))
            starts.append(b)
            ends.append(e)
        self._seg, self._start, self._end = (np.concatenate(x) for x in (seg_ids, starts, ends))
        pairs = self._end - self._start  # targets of a document: its tokens after the first
        chunks = -(-pairs // seq_len)
        self._row_ends = np.cumsum(chunks)
        self._chunks = chunks

    def _documents(self, arr: TokenArray) -> tuple[np.ndarray, np.ndarray]:
        """(first token, last token) of each document of a segment, read in chunks."""
        n = len(arr)
        if self.eos_id is None:
            return np.array([0], np.int64), np.array([n - 1], np.int64)
        hits = [
            np.flatnonzero(arr.data[i : i + (1 << 22)] == self.eos_id) + i
            for i in range(0, n, 1 << 22)
        ]
        ends = np.concatenate(hits) if hits else np.zeros(0, np.int64)
        if not len(ends) or ends[-1] != n - 1:
            ends = np.append(ends, n - 1)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return starts.astype(np.int64), ends.astype(np.int64)

    def __len__(self) -> int:
        return int(self._row_ends[-1]) if len(self._row_ends) else 0

    @property
    def num_tokens(self) -> int:
        """Tokens of the documents that give rows."""
        return int((self._end - self._start + 1)[self._chunks > 0].sum())

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{"inputs", "targets", "segment_ids", "positions", "mask"}: [n, L]; padding has
        segment id 0 and mask 0."""
        idx = np.asarray(indices, dtype=np.int64)
        n, length = idx.shape[0], self.seq_len
        window = np.full((n, length + 1), self.pad_id, dtype=np.int32)
        token_mask = np.zeros((n, length + 1), dtype=np.float32)
        real = np.zeros((n, length + 1), dtype=bool)
        doc = np.searchsorted(self._row_ends, idx, side="right")
        chunk = idx - np.where(doc > 0, self._row_ends[doc - 1], 0)
        for r in range(n):
            d = doc[r]
            first = self._start[d] + chunk[r] * length
            last = min(first + length, self._end[d])  # inclusive
            k = int(last - first + 1)
            window[r, :k] = self.segments[self._seg[d]].data[first : last + 1]
            real[r, :k] = True
            if self.masks is not None:
                token_mask[r, :k] = self.masks[self._seg[d]][first : last + 1]
        mask = (real[:, :-1] & real[:, 1:]).astype(np.float32)
        if self.masks is not None:
            mask *= token_mask[:, 1:]
        cols = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))
        return {
            "inputs": np.ascontiguousarray(window[:, :-1]),
            "targets": np.ascontiguousarray(window[:, 1:]),
            "segment_ids": real[:, :-1].astype(np.int32),
            "positions": np.ascontiguousarray(cols),
            "mask": mask,
        }


class RowRange:
    """Rows [start, stop) of a row source: how one stream is split into train and held-out
    tails."""

    def __init__(self, source: PackedRows | PaddedRows, start: int, stop: int):
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"row range [{start}, {stop}) outside [0, {len(source)}]")
        self.source, self.start, self.stop = source, start, stop
        self.seq_len = source.seq_len

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def num_tokens(self) -> int:
        """The source's tokens in proportion to the rows taken."""
        return round(self.source.num_tokens * len(self) / max(len(self.source), 1))

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The source's rows start + indices."""
        return self.source.take(np.asarray(indices, dtype=np.int64) + self.start)


def split_tail(rows: PackedRows | PaddedRows, val_fraction: float) -> tuple[object, object | None]:
    """(train, held-out): the last `val_fraction` of the rows held out (at least one, when
    there are two or more rows and the fraction is positive)."""
    n = len(rows)
    n_val = int(np.ceil(n * val_fraction)) if val_fraction > 0 and n >= 2 else 0
    if n_val == 0:
        return rows, None
    return RowRange(rows, 0, n - n_val), RowRange(rows, n - n_val, n)
