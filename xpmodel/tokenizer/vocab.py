"""What a vocabulary may hold: the bounds on ids, tokens and special tokens,
the checks of merges and tokens against them, and which token each merge makes.
"""
import operator

from ..errors import UsageError, quote
from ..options import MAX_VOCAB

# Bounds on what a tokenizer file may describe, checked from its sizes before
# anything is built: real vocabularies have at most a few hundred thousand ids
# (MAX_VOCAB) and tokens of at most a few hundred bytes.
MAX_TOKEN_BYTES = 1 << 14
MAX_TOTAL_TOKEN_BYTES = 1 << 28
_MAX_SPECIAL_TOKENS = 1024
_MAX_SPECIAL_CHARS = 256
# A merge's key orders merges by rank and names the token it makes:
# rank << RANK_SHIFT | id. When merge k makes id 256 + k the key is the id.
RANK_SHIFT = 20
ID_MASK = (1 << RANK_SHIFT) - 1
assert MAX_VOCAB <= 1 << RANK_SHIFT


def check_special_tokens(special_tokens):
    if isinstance(special_tokens, str) or not all(
            isinstance(s, str) and s for s in special_tokens):
        raise UsageError("special_tokens must be a sequence of non-empty strings, "
                         f"got {quote(special_tokens, 80)}")
    if len(special_tokens) > _MAX_SPECIAL_TOKENS:
        raise UsageError(f"{len(special_tokens):,} special tokens, more than the "
                         f"{_MAX_SPECIAL_TOKENS} xpmodel supports")
    for s in special_tokens:
        if len(s) > _MAX_SPECIAL_CHARS:
            raise UsageError(f"special token {quote(s, 40)} is {len(s):,} characters, more than "
                             f"{_MAX_SPECIAL_CHARS}")
    if len(set(special_tokens)) != len(special_tokens):
        raise UsageError(f"special_tokens has duplicates: {list(special_tokens)}")


def check_token_lengths(merges):
    """Refuse merges that refer to later ids or build absurdly long tokens,
    from the lengths alone (a chain of 41 doublings would be 2 TiB)."""
    lengths = [1] * 256
    total = 256
    for k, (left, right) in enumerate(merges):
        new_id = 256 + k
        if not (0 <= left < new_id and 0 <= right < new_id):
            raise UsageError(f"merge {k} {[left, right]} refers to an id not defined before it")
        length = lengths[left] + lengths[right]
        if length > MAX_TOKEN_BYTES:
            raise UsageError(f"merge {k} builds a token of {length:,} bytes, more than the "
                             f"{MAX_TOKEN_BYTES:,} xpmodel allows")
        total += length
        if total > MAX_TOTAL_TOKEN_BYTES:
            raise UsageError(f"the merges build {total:,}+ bytes of tokens, more than the "
                             f"{MAX_TOTAL_TOKEN_BYTES:,} xpmodel allows")
        lengths.append(length)


def merged_bytes(merges):
    """The bytes of the tokens that merges[k] makes as id 256 + k."""
    table = [bytes([i]) for i in range(256)]
    for left, right in merges:
        table.append(table[left] + table[right])
    return table[256:]


def check_tokens(tokens):
    """`tokens` as a tuple of bytes; refused if one is empty or they are absurdly long."""
    checked = []
    total = 256
    for k, token in enumerate(tokens):
        if not isinstance(token, (bytes, bytearray)) or not token:
            raise UsageError(f"token {256 + k} is {quote(token, 40)}, not non-empty bytes")
        if len(token) > MAX_TOKEN_BYTES:
            raise UsageError(f"token {256 + k} is {len(token):,} bytes, more than the "
                             f"{MAX_TOKEN_BYTES:,} xpmodel allows")
        total += len(token)
        if total > MAX_TOTAL_TOKEN_BYTES:
            raise UsageError(f"the tokens are {total:,}+ bytes, more than the "
                             f"{MAX_TOTAL_TOKEN_BYTES:,} xpmodel allows")
        checked.append(bytes(token))
    return tuple(checked)


def made_ids(merges, token_bytes, metaspace):
    """For each merge, the id of the token it makes: the one whose bytes are its
    sides' bytes joined. Tokens must differ in bytes; with a metaspace a token
    may be one byte (a character's token, apart from the byte's fallback id),
    but merges join tokens, not fallback bytes."""
    first = 256 if metaspace else 0
    ids = {}
    for token_id in range(first, len(token_bytes)):
        other = ids.setdefault(token_bytes[token_id], token_id)
        if other != token_id:
            raise UsageError(f"ids {other} and {token_id} are both "
                             f"{quote(token_bytes[token_id], 40)}")
    made = []
    for rank, (left, right) in enumerate(merges):
        if not (is_id_below(left, len(token_bytes)) and is_id_below(right, len(token_bytes))):
            raise UsageError(f"merge {rank} {[left, right]} refers to an id that is not a token")
        if left < first or right < first:
            raise UsageError(f"merge {rank} {[left, right]} joins a fallback byte; "
                             f"metaspace merges join tokens")
        merged = token_bytes[left] + token_bytes[right]
        if merged not in ids:
            raise UsageError(f"merge {rank} {[left, right]} makes {quote(merged, 40)}, "
                             f"which is not a token")
        made.append(ids[merged])
    return made


def sides_made_first(merges, made):
    """Whether every merge ranks after all the merges that make its sides."""
    last_made = {}   # id -> rank of the last merge that makes it
    for rank, new_id in enumerate(made):
        last_made[new_id] = rank
    return all(last_made.get(left, -1) < rank and last_made.get(right, -1) < rank
               for rank, (left, right) in enumerate(merges))


def is_id_below(value, limit):
    try:
        return 0 <= operator.index(value) < limit
    except TypeError:
        return False


def is_iterable(value):
    try:
        iter(value)
    except TypeError:
        return False
    return True
