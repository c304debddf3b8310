"""Pre-tokenization of byte-level BPE: text into the pieces whose bytes are merged.

GPT-2's regex by default (words with their leading space, digit runs,
punctuation runs, whitespace runs), or another split pattern, as Llama 3 and
Qwen2 use, cut as Hugging Face's Split with behavior "Isolated" cuts: the
matches and the text between them are the pieces. NORMALIZERS names what
may put text in a normal form before it is split.
"""
import regex

from ..errors import UsageError, one_line, quote

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
NORMALIZERS = ("nfc",)
MAX_SPLIT_PATTERN_BYTES = 4096

_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)


def check_split_pattern(pattern):
    """The compiled `pattern`, or UsageError saying in one line why it is not usable.

    Hugging Face compiles split patterns with Oniguruma, whose ^ and $ match at
    line breaks, so they are compiled MULTILINE here. The `regex` module and
    Oniguruma agree on the syntax such patterns use (classes, \\p{..},
    lookaheads, (?i:...)); the tests check GPT-2's, Llama 3's and Qwen2's
    patterns id for id against the `tokenizers` library.
    """
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"the split pattern must be a non-empty string, got {quote(pattern, 60)}")
    size = len(pattern.encode("utf-8", errors="replace"))
    if size > MAX_SPLIT_PATTERN_BYTES:
        raise UsageError(f"the split pattern is {size:,} bytes, more than the "
                         f"{MAX_SPLIT_PATTERN_BYTES:,} xpmodel allows")
    try:
        return regex.compile(pattern, regex.MULTILINE)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise UsageError(f"the split pattern {quote(pattern, 60)} does not compile: "
                         f"{one_line(exc)}") from None




def splitter(pattern):
    """A function text -> the list of its pieces under `pattern`, "Isolated".

    For every pattern that can neither match the empty string nor skip text
    (GPT-2's, Llama 3's and Qwen2's), `findall` gives the pieces; `_isolated`
    handles any other exactly, more slowly.
    """
    if pattern == GPT2_SPLIT_PATTERN:
        return _SPLIT.findall
    compiled = check_split_pattern(pattern)
    if compiled.groups:   # findall would return the groups, not the matches
        return lambda text: _isolated(compiled, text)

    def pieces(text):
        found = compiled.findall(text)
        if sum(map(len, found)) == len(text) and "" not in found:
            return found
        return _isolated(compiled, text)
    return pieces


def _isolated(compiled, text):
    """The pieces of Hugging Face's Split(pattern, "Isolated"): each match and
    each run of text between matches, empty ones dropped. Matches are found
    as the Rust `onig` crate's find_iter finds them: an empty match right
    where the previous match ended is skipped by moving on one character."""
    pieces = []
    start = search_at = 0      # start: end of the text already cut into pieces
    last_match_end = None
    while search_at <= len(text):
        match = compiled.search(text, search_at)
        if match is None:
            break
        begin, end = match.span()
        if begin == end and last_match_end == end:
            search_at += 1
            continue
        if begin > start:
            pieces.append(text[start:begin])
        if end > begin:
            pieces.append(text[begin:end])
        start = search_at = last_match_end = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces
