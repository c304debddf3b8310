"""Pre-tokenization of byte-level BPE: text into the pieces whose bytes are merged.

GPT-2's regex by default (words with their leading space, digit runs,
punctuation runs, whitespace runs), or another split pattern, as Llama 3 and
Qwen2 use, cut as Hugging Face's Split with behavior "Isolated" cuts: the
matches and the text between them are the pieces. NORMALIZERS names what
may put text in a normal form before it is split.

A split pattern comes from a file, and a backtracking engine can take
exponential time on a pattern such as (\\w?){1,9}{1,9}x. So a pattern other
than the three below, which match in time linear in the text, is tried on
short adversarial strings when it is checked, and every split by it runs
under a budget of CPU time that grows with the text (the `regex` module's
`timeout`): past it, a one-line error names the pattern. The three known
patterns run without a budget, because the budget's clock costs about a
microsecond per piece.
"""
import functools
import time

import regex

from ..errors import DataError, UsageError, one_line, quote

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                       r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Patterns known to match in linear time: every alternative either consumes
# the run of one character class it starts on or fails after looking at most
# one run ahead. They split without a time budget.
LINEAR_SPLIT_PATTERNS = (GPT2_SPLIT_PATTERN, LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN)
NORMALIZERS = ("nfc",)
MAX_SPLIT_PATTERN_BYTES = 4096
# CPU seconds one split of `n` characters may take: SPLIT_SECONDS +
# n * SPLIT_SECONDS_PER_CHAR. Linear patterns take well under 1 us a
# character even with the budget's clock (Tiny Shakespeare ~0.3 us, a text
# of one-digit pieces ~1 us), so 100 us leaves a wide margin on a slow or
# busy machine; the 1 MiB chunks of `prepare` get about 100 s each.
SPLIT_SECONDS = 2.0
SPLIT_SECONDS_PER_CHAR = 1e-4
# CPU seconds that all the probes of one pattern may take (linear patterns:
# about a millisecond).
PROBE_SECONDS = 1.0

_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)


def _probe_texts():
    """Runs of one character class, bare and followed by a character that few
    patterns expect, and runs of two classes interleaved: the strings on which
    nested or overlapping repeats backtrack exponentially."""
    runs = ["a", "Z", "1", "_", " ", "\t", "\n", "\r\n", "!", "'", ".", "-", "\u00e9", "\u4e2d",
            "\u0663", "\x00", "\u2028", "\u00a0"]
    texts = []
    for char in runs:
        run = char * (32 // len(char))
        texts += [run, run + "\x01", run + "a", run + " "]
    pairs = ["a", "1", " ", "!", "\n", "'"]
    texts += [(a + b) * 16 for a in pairs for b in pairs if a != b]
    return tuple(texts)


_PROBE_TEXTS = _probe_texts()


def check_split_pattern(pattern):
    """The compiled `pattern`, or UsageError saying in one line why it is not usable.

    Hugging Face compiles split patterns with Oniguruma, whose ^ and $ match at
    line breaks, so they are compiled MULTILINE here. The `regex` module and
    Oniguruma agree on the syntax such patterns use (classes, \\p{..},
    lookaheads, (?i:...)); the tests check GPT-2's, Llama 3's and Qwen2's
    patterns id for id against the `tokenizers` library. A pattern that is
    not one of LINEAR_SPLIT_PATTERNS must split each of the probe strings
    within PROBE_SECONDS in all.
    """
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"the split pattern must be a non-empty string, got {quote(pattern, 60)}")
    size = len(pattern.encode("utf-8", errors="replace"))
    if size > MAX_SPLIT_PATTERN_BYTES:
        raise UsageError(f"the split pattern is {size:,} bytes, more than the "
                         f"{MAX_SPLIT_PATTERN_BYTES:,} xpmodel allows")
    return _compiled_and_probed(pattern)


@functools.lru_cache(maxsize=32)
def _compiled_and_probed(pattern):
    """check_split_pattern's work once per pattern (a tokenizer is built in
    every worker and again after an import checked its pattern)."""
    try:
        compiled = regex.compile(pattern, regex.MULTILINE)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise UsageError(f"the split pattern {quote(pattern, 60)} does not compile: "
                         f"{one_line(exc)}") from None
    if pattern not in LINEAR_SPLIT_PATTERNS:
        deadline = time.process_time() + PROBE_SECONDS
        for text in _PROBE_TEXTS:
            try:
                _budgeted_pieces(compiled, text, deadline)
            except TimeoutError:
                raise UsageError(f"the split pattern {quote(pattern, 60)} backtracks too much: "
                                 f"splitting {quote(text, 50)} took more than {PROBE_SECONDS:g} "
                                 f"s of CPU (catastrophic backtracking: nested or "
                                 f"overlapping repeats)") from None
    return compiled


def splitter(pattern):
    """A function text -> the list of its pieces under `pattern`, "Isolated".

    For every pattern that can neither match the empty string nor skip text
    (GPT-2's, Llama 3's and Qwen2's), `findall` gives the pieces; `_isolated`
    handles any other exactly, more slowly. A pattern not in
    LINEAR_SPLIT_PATTERNS splits under the time budget of the module
    docstring, and raises DataError naming it when the budget runs out.
    """
    if pattern == GPT2_SPLIT_PATTERN:
        return _SPLIT.findall
    compiled = check_split_pattern(pattern)
    if pattern in LINEAR_SPLIT_PATTERNS:   # no groups, no empty match, nothing skipped
        return compiled.findall

    def budgeted(text):
        seconds = SPLIT_SECONDS + len(text) * SPLIT_SECONDS_PER_CHAR
        try:
            return _budgeted_pieces(compiled, text, time.process_time() + seconds)
        except TimeoutError:
            raise DataError(f"the split pattern {quote(pattern, 60)} backtracks too much: "
                            f"splitting {len(text):,} characters took more than {seconds:.1f} s "
                            f"of CPU (catastrophic backtracking: nested or overlapping "
                            f"repeats)") from None
    return budgeted


def _budgeted_pieces(compiled, text, deadline):
    """The pieces of `text` ("Isolated"), raising TimeoutError once the CPU
    clock (time.process_time, the clock of `regex`'s timeout) passes `deadline`."""
    def remaining():
        left = deadline - time.process_time()
        if left <= 0:
            raise TimeoutError("regex timed out")
        return left
    if not compiled.groups:
        found = compiled.findall(text, timeout=remaining())
        if sum(map(len, found)) == len(text) and "" not in found:
            return found
    return _isolated(compiled, text, remaining)


def _isolated(compiled, text, remaining=None):
    """The pieces of Hugging Face's Split(pattern, "Isolated"): each match and
    each run of text between matches, empty ones dropped. Matches are found
    as the Rust `onig` crate's find_iter finds them: an empty match right
    where the previous match ended is skipped by moving on one character.
    `remaining`: None, or a function -> the seconds each search may take."""
    pieces = []
    start = search_at = 0      # start: end of the text already cut into pieces
    last_match_end = None
    while search_at <= len(text):
        timeout = None if remaining is None else remaining()
        match = compiled.search(text, search_at, timeout=timeout)
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
