"""Which rows of which source make global batch k: a deterministic, random-access sampler.

Each source is read as an endless stream of epochs, each epoch a fresh permutation of its rows
(a NumPy permutation; grain's O(1)-memory index shuffle for sources above 2**25 rows). Batch k
takes c_s(k) rows from source s, the next ones of its stream. The counts come from systematic
sampling at the stage's weights w: with one uniform u_k per batch, row r of the batch falls in
source s when (r + u_k) / B lies in [W_s, W_s+1) (W the cumulative weights), so
c_s(k) = ceil(B W_s+1 - u_k) - ceil(B W_s - u_k): always floor or ceil of B w_s, and B w_s on
average. A source's stream position at batch k is the sum of its earlier counts, computed in
vectorized chunks and cached, so batch k costs O(B) and resuming at step k costs O(k / 4096)
vectorized chunks. The batch's rows are then put in a per-batch random order, and process p of
P takes rows [p B/P, (p+1) B/P): the processes' shares are disjoint and concatenate to the
one-process batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

_CHUNK = 4096  # batches per vectorized block of mixture counts
_CACHED = 1 << 25  # rows of a source up to which an epoch's permutation is an array (128 MB)
_TAG_U, _TAG_ORDER, _TAG_SHUFFLE = 0x6D6978, 0x6F7264, 0x736866  # separate random streams


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class Mixture:
    """Global batch k -> (source of each row, position of the row in that source's stream)."""

    def __init__(
        self,
        sizes: Sequence[int],
        stages: Sequence[tuple[int, Sequence[float]]],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
    ):
        """`stages`: (first step, weights) with the first stage at step 0; `shuffle` False
        keeps each source's rows and the batch's rows in order (held-out batches)."""
        self.sizes, self.batch_size = list(sizes), batch_size
        self.seed, self.shuffle = seed, shuffle
        self.starts = np.array([s for s, _ in stages], dtype=np.int64)
        cum = []
        for _, w in stages:
            w = np.asarray(w, dtype=np.float64)
            c = np.concatenate([[0.0], np.cumsum(w / w.sum())])
            c[-1] = 1.0
            cum.append(c)
        self.cumulative = np.stack(cum)  # [stages, sources + 1]
        self._cursors = [np.zeros(len(self.sizes), dtype=np.int64)]  # at each chunk start
        self._last: tuple[int, np.ndarray] | None = None  # the latest chunk's counts
        self._lock = threading.Lock()  # grain reads batches on several threads
        self._streams = [
            _Epochs(n, _seed(seed, _TAG_SHUFFLE, s)) if shuffle else None
            for s, n in enumerate(self.sizes)
        ]

    def _counts(self, chunk: int) -> np.ndarray:
        """int64 [_CHUNK, sources]: rows per source of each batch of a chunk."""
        last = self._last
        if last is not None and last[0] == chunk:
            return last[1]
        k = chunk * _CHUNK + np.arange(_CHUNK)
        u = np.random.default_rng([self.seed, _TAG_U, chunk]).random(_CHUNK)
        cum = self.cumulative[np.searchsorted(self.starts, k, side="right") - 1]
        counts = np.diff(np.ceil(self.batch_size * cum - u[:, None]).astype(np.int64), axis=1)
        self._last = (chunk, counts)
        return counts

    def cursors(self, k: int) -> np.ndarray:
        """Rows each source gave to batches 0..k-1 (its stream position at batch k)."""
        chunk = k // _CHUNK
        with self._lock:
            while len(self._cursors) <= chunk:
                c = len(self._cursors) - 1
                self._cursors.append(self._cursors[c] + self._counts(c).sum(axis=0))
            start = self._cursors[chunk]
        return start + self._counts(chunk)[: k - chunk * _CHUNK].sum(axis=0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index [B], row index within that source [B]) of global batch k."""
        counts = self._counts(k // _CHUNK)[k % _CHUNK]
        start = self.cursors(k)
        source = np.repeat(np.arange(len(self.sizes)), counts)
        stream_pos = np.concatenate([start[s] + np.arange(c) for s, c in enumerate(counts)])
        if self.shuffle:
            order = np.random.default_rng([self.seed, _TAG_ORDER, k]).permutation(len(source))
            source, stream_pos = source[order], stream_pos[order]
            row = np.empty(len(source), dtype=np.int64)
            for s in np.unique(source):
                where = source == s
                row[where] = self._streams[s](stream_pos[where])
        else:
            row = stream_pos % np.asarray(self.sizes)[source]
        return source, row.astype(np.int64)


class _Epochs:
    """One source's endless row order: epoch e is a fresh permutation of its n rows. Up to
    _CACHED rows the permutation is a NumPy array (the latest two epochs kept); beyond, grain's
    O(1)-memory index shuffle maps row by row (about 0.1 ms a row on the CPU here)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, Any] = {}
        self._lock = threading.Lock()  # grain reads batches on several threads

    def _epoch(self, e: int) -> Any:
        with self._lock:
            perm = self._cache.get(e)
            if perm is None:
                if self.n <= _CACHED:
                    perm = np.random.default_rng([self.seed, e]).permutation(self.n)
                    perm = perm.astype(np.int32 if self.n < 1 << 31 else np.int64)
                else:
                    perm = grain.MapDataset.range(self.n).shuffle(seed=_seed(self.seed, e))
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[e] = perm
        return perm

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Rows at stream positions (epoch = position // n)."""
        epochs, within = np.divmod(np.asarray(positions, dtype=np.int64), self.n)
        out = np.empty(len(within), dtype=np.int64)
        for e in np.unique(epochs):
            where = epochs == e
            perm = self._epoch(int(e))
            if isinstance(perm, np.ndarray):
                out[where] = perm[within[where]]
            else:
                out[where] = [perm[int(i)] for i in within[where]]
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed}  # workers rebuild what they use

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["n"], state["seed"])


class MixtureBatches:
    """Picklable `k -> this process's rows of global batch k` (grain maps it over k)."""

    def __init__(
        self, sources: Sequence[Any], mixture: Mixture, process_index: int, process_count: int
    ):
        self.sources, self.mixture = list(sources), mixture
        local = mixture.batch_size // process_count
        self._lo, self._hi = process_index * local, (process_index + 1) * local

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        source, row = self.mixture.rows(int(k))
        source, row = source[self._lo : self._hi], row[self._lo : self._hi]
        out: dict[str, np.ndarray] = {}
        for s in np.unique(source):
            where = np.flatnonzero(source == s)
            part = self.sources[s].take(row[where])
            for key, value in part.items():
                if key not in out:
                    out[key] = np.empty((len(source), *value.shape[1:]), dtype=value.dtype)
                out[key][where] = value
        return out
