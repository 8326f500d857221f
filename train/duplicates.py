"""Near-duplicate search over perceptual hashes without comparing every pair, and duplicate groups.

Multi-index hashing: split each hash into threshold + 1 bands. Two hashes that differ in at most
`threshold` bits agree exactly on at least one band (pigeonhole), so candidates are pairs sharing
a band value; they are found by sorting each band and comparing neighbours inside equal runs,
and verified with a vectorized popcount. Identical hashes are collapsed first, so a flood of
identical (e.g. blank) images costs one comparison, not n^2.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def pack_hashes(bits: np.ndarray) -> np.ndarray:
    """Boolean hashes (n, nbits) -> (n, words) uint64, for XOR + popcount."""
    bits = np.asarray(bits, dtype=bool).reshape(len(bits), -1)
    packed = np.packbits(bits, axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of packed hashes."""
    return np.bitwise_count(a ^ b).sum(axis=1, dtype=np.int64)


def near_duplicate_pairs(bits: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of hashes within `threshold` bits: arrays i, j, distance (sorted by i, j)."""
    bits = np.asarray(bits, dtype=bool).reshape(len(bits), -1)
    n, nbits = bits.shape
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    words = pack_hashes(bits)
    unique_rows, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    unique_bits = bits[first]
    ui, uj, ud = _distinct_pairs(unique_rows, unique_bits, min(threshold, nbits))
    pairs = [_expand_across(ui, uj, ud, inverse), _expand_within(inverse)]
    i = np.concatenate([p[0] for p in pairs])
    j = np.concatenate([p[1] for p in pairs])
    d = np.concatenate([p[2] for p in pairs])
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def _band_keys(bits: np.ndarray, bands: int):
    edges = np.linspace(0, bits.shape[1], bands + 1).round().astype(int)
    for start, stop in zip(edges[:-1], edges[1:]):
        if stop > start:
            weights = np.left_shift(np.int64(1), np.arange(stop - start, dtype=np.int64))
            yield bits[:, start:stop].astype(np.int64) @ weights


def _distinct_pairs(words: np.ndarray, bits: np.ndarray, threshold: int):
    """Pairs of distinct hashes within threshold (indices into words)."""
    u = len(words)
    found = []
    for keys in _band_keys(bits, threshold + 1):
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], u]
        run_end = np.repeat(ends, ends - starts)
        active = np.flatnonzero(run_end - np.arange(u) > 1)
        step = 1
        # Compare each position with the one `step` further on in the same run; runs shrink the
        # active set, so the total work is the number of candidate pairs, in numpy.
        while active.size:
            a, b = order[active], order[active + step]
            d = hamming(words[a], words[b])
            keep = d <= threshold
            found.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep], d[keep]]))
            step += 1
            active = active[active + step < run_end[active]]
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    triples = np.concatenate(found, axis=1)
    _, keep = np.unique(triples[0] * u + triples[1], return_index=True)
    return triples[0][keep], triples[1][keep], triples[2][keep]


def _members(inverse: np.ndarray):
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return order, counts, starts


def _expand_across(ui, uj, ud, inverse):
    """Pairs of distinct hash values -> every pair of the images that carry them."""
    order, counts, starts = _members(inverse)
    ca, cb = counts[ui], counts[uj]
    per_pair = ca * cb
    pair = np.repeat(np.arange(len(ui)), per_pair)
    local = np.arange(per_pair.sum()) - np.repeat(np.cumsum(per_pair) - per_pair, per_pair)
    i = order[starts[ui][pair] + local // cb[pair]]
    j = order[starts[uj][pair] + local % cb[pair]]
    return np.minimum(i, j), np.maximum(i, j), ud[pair]


def _expand_within(inverse):
    """Images that share one hash value: every pair of them, distance 0."""
    order, counts, starts = _members(inverse)
    out_i, out_j = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for size in np.unique(counts[counts > 1]):
        values = np.flatnonzero(counts == size)
        a, b = np.triu_indices(size, 1)
        i = order[starts[values][:, None] + a].ravel()
        j = order[starts[values][:, None] + b].ravel()
        out_i.append(np.minimum(i, j))
        out_j.append(np.maximum(i, j))
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    return i, j, np.zeros(len(i), dtype=np.int64)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (i, j): a component id per node, 0..k-1."""
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def equal_value_pairs(values) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining every item to the first item with the same value (e.g. the same pixel hash)."""
    first: dict = {}
    i, j = [], []
    for index, value in enumerate(values):
        if value is None:
            continue
        head = first.setdefault(value, index)
        if head != index:
            i.append(head)
            j.append(index)
    return np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
