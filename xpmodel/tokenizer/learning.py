"""Training: the merges learned from the pieces of a corpus, most frequent pair first."""
import heapq
from collections import defaultdict

from ..errors import counted, quote
from .vocab import MAX_TOKEN_BYTES, MAX_TOTAL_TOKEN_BYTES, is_iterable


def training_texts(texts):
    """`train`'s texts (a str or an iterable of str), one str at a time."""
    if isinstance(texts, str):
        yield texts
        return
    if isinstance(texts, (bytes, bytearray)) or not is_iterable(texts):
        raise TypeError(f"texts must be a str or an iterable of str, got {quote(texts, 60)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or an iterable of str; text {i} is "
                            f"{quote(text, 60)}")
        yield text


def learn_merges(word_counts, num_merges):
    """Learn up to `num_merges` merges from a Counter of piece str -> frequency.

    Each unique piece is a list of ids. `pair_counts` holds the weighted count
    of every adjacent pair, `pair_words` which pieces may hold it (entries go
    stale, and are skipped, once a piece no longer holds the pair). A merge
    rewrites only the pieces that hold its pair and adjusts the counts of the
    neighbouring pairs; a heap of (-count, left, right) with lazy invalidation
    finds the next best pair.

    A pair whose token would be longer than MAX_TOKEN_BYTES is never merged,
    and learning stops before the tokens' bytes pass MAX_TOTAL_TOKEN_BYTES:
    the tokenizer loads what it learns.
    """
    words = [list(piece.encode("utf-8")) for piece in word_counts]   # unique pieces, as ids
    freqs = list(word_counts.values())                                # how often each occurs
    pair_counts, pair_words, heap = _pair_statistics(words, freqs)
    known_bytes = {bytes([i]) for i in range(256)}
    token_bytes = [bytes([i]) for i in range(256)]
    total_bytes = 256
    merges = []
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count:
            continue  # stale: the count changed and a newer entry was pushed
        left, right = pair
        merged_bytes = token_bytes[left] + token_bytes[right]
        if merged_bytes in known_bytes or len(merged_bytes) > MAX_TOKEN_BYTES:
            del pair_counts[pair]  # never merged: the bytes have an id, or are too long for one
            continue
        total_bytes += len(merged_bytes)
        if total_bytes > MAX_TOTAL_TOKEN_BYTES:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes.append(merged_bytes)
        known_bytes.add(merged_bytes)
        del pair_counts[pair]
        deltas = defaultdict(int)
        for index in pair_words.pop(pair):
            _merge_in_word(words, index, freqs[index], left, right, new_id, deltas, pair_words)
        deltas.pop(pair, None)
        _apply_deltas(deltas, pair_counts, heap)
    return merges


def _pair_statistics(words, freqs):
    """(pair -> weighted count, pair -> indices of the words holding it, a
    heap of (-count, pair)) of the adjacent pairs in `words`."""
    pair_counts = defaultdict(int)
    pair_words = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[index]
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    return pair_counts, pair_words, heap


def _apply_deltas(deltas, pair_counts, heap):
    """Add a merge's changes of pair counts, pushing each new count on the heap."""
    for changed, delta in deltas.items():
        if delta:
            count = pair_counts[changed] + delta
            if count > 0:
                pair_counts[changed] = count
                heapq.heappush(heap, (-count, changed))
            else:
                del pair_counts[changed]


def _merge_in_word(words, index, freq, left, right, new_id, deltas, pair_words):
    """Replace every (left, right) in words[index] by new_id, left to right.

    Records the change in the counts of neighbouring pairs in `deltas` and
    indexes the new pairs. The left neighbour is read from the merged output,
    so back-to-back merges ("abab" -> "XX") count the pair between them once.
    """
    word = words[index]
    n = len(word)
    merged = []
    i = 0
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            if merged:
                before = merged[-1]
                deltas[(before, left)] -= freq
                deltas[(before, new_id)] += freq
                pair_words[(before, new_id)].add(index)
            if i + 2 < n:
                after = word[i + 2]
                deltas[(right, after)] -= freq
                deltas[(new_id, after)] += freq
                pair_words[(new_id, after)].add(index)
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    if len(merged) != n:
        words[index] = merged


def vocab_size_note(tokenizer, requested):
    """None when `tokenizer`, trained for `requested` ids, has that many;
    else why it has another count, for a note ("45,351 ids, not 50,304: ...")."""
    have = tokenizer.vocab_size
    if have == requested:
        return None
    why = f"{have:,} ids, not {requested:,}"
    if have > requested:
        specials = counted(len(tokenizer.special_tokens), "special token")
        return f"{why}: the 256 byte ids and {specials} are always there"
    held = sum(len(tokenizer.token_bytes(i)) for i in range(256 + len(tokenizer.merges)))
    if held + MAX_TOKEN_BYTES > MAX_TOTAL_TOKEN_BYTES:
        return f"{why}: the tokens reached the {MAX_TOTAL_TOKEN_BYTES:,} bytes a tokenizer may hold"
    return (f"{why}: after {counted(len(tokenizer.merges), 'merge')} the corpus held no pair "
            f"of adjacent tokens left to merge")
