"""Encode-time merging: one piece's ids merged by rank into its tokens' ids."""
import heapq

from .vocab import ID_MASK

# Pieces longer than this are merged with a heap (O(n log n)) instead of
# repeated scans (O(n * merges applied)): a long run of spaces or a base64 blob
# would otherwise be quadratic.
LONG_PIECE = 64


def merge_short(ids, merge_ids):
    """Apply merges to one piece's ids, lowest merge key (= rank) first.

    `merge_ids` maps a pair to its merge key (see vocab.RANK_SHIFT). Each round
    merges every occurrence of the best pair, left to right: the same as
    `merge_long` when no merge ranks before those that make its sides."""
    get = merge_ids.get
    while len(ids) > 1:
        best_key = None
        for pair in zip(ids, ids[1:]):
            key = get(pair)
            if key is not None and (best_key is None or key < best_key):
                best_key, best_pair = key, pair
        if best_key is None:
            break
        best_id = best_key & ID_MASK
        left, right = best_pair
        merged = []
        i, n = 0, len(ids)
        while i < n:
            if ids[i] == left and i + 1 < n and ids[i + 1] == right:
                merged.append(best_id)
                i += 2
            else:
                merged.append(ids[i])
                i += 1
        ids = merged
    return ids


def merge_long(ids, merge_ids):
    """Apply merges to one piece's ids in O(n log n), as Hugging Face's BPE does.

    Symbols form a linked list; a heap holds candidate merges keyed by
    (merge key, position), so the lowest rank applies first and equal ranks
    left to right, also when a merge creates a pair that ranks before it.
    Stale heap entries are skipped by checking the two symbols are still
    there and unchanged.
    """
    n = len(ids)
    symbols = list(ids)               # (n,) id at each position; -1 once merged away
    next_pos = list(range(1, n + 1))  # (n,) n means none
    prev_pos = list(range(-1, n - 1))  # (n,) -1 means none
    heap = []
    for pos in range(n - 1):
        key = merge_ids.get((symbols[pos], symbols[pos + 1]))
        if key is not None:
            heap.append((key, pos, symbols[pos], symbols[pos + 1]))
    heapq.heapify(heap)
    while heap:
        key, pos, left, right = heapq.heappop(heap)
        right_pos = next_pos[pos]
        if symbols[pos] != left or right_pos >= n or symbols[right_pos] != right:
            continue
        new_id = key & ID_MASK
        symbols[pos] = new_id
        symbols[right_pos] = -1
        after = next_pos[right_pos]
        next_pos[pos] = after
        if after < n:
            prev_pos[after] = pos
            candidate = merge_ids.get((new_id, symbols[after]))
            if candidate is not None:
                heapq.heappush(heap, (candidate, pos, new_id, symbols[after]))
        before = prev_pos[pos]
        if before >= 0:
            candidate = merge_ids.get((symbols[before], new_id))
            if candidate is not None:
                heapq.heappush(heap, (candidate, before, symbols[before], new_id))
    return [s for s in symbols if s >= 0]
