"""Ids back into text as they arrive: `IncrementalDecoder`, which
`BPETokenizer.decode` and `incremental_decoder` use."""
import codecs
import itertools

import numpy

from ..errors import quote
from .vocab import is_iterable


class IncrementalDecoder:
    """Text from ids that arrive a few at a time, as a model samples them.

    Each `decode(ids)` returns the text the ids complete; the texts of all
    calls, the last with `final`, join into `BPETokenizer.decode` of all the
    ids. Until `final`, text that later ids could still change is held back:
    a character whose UTF-8 bytes have not all arrived and, with a metaspace,
    a run of byte ids that has not ended (one byte that is not UTF-8 makes
    the whole run U+FFFD).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._byte_run = bytearray()   # metaspace: the bytes of the byte ids since the last other id
        metaspace = tokenizer.metaspace
        self._strip = metaspace is not None and metaspace.strip_decoded   # no text out yet

    def decode(self, ids, final=False):
        tokenizer = self._tokenizer
        if tokenizer.metaspace is None:
            return self._utf8.decode(tokenizer.decode_bytes(ids), final)
        ids = id_list(ids)
        tokenizer.decode_bytes(ids)   # refuses an id outside the vocabulary
        parts = []
        for is_byte, run in itertools.groupby(ids, key=(256).__gt__):
            data = tokenizer.decode_bytes(list(run))
            if is_byte:
                parts.append(self._utf8.decode(b"", final=True))
                self._byte_run += data
            else:
                parts.append(self._end_byte_run())
                parts.append(self._utf8.decode(data))
        if final:
            parts.append(self._end_byte_run())
            parts.append(self._utf8.decode(b"", final=True))
        text = "".join(parts)
        if self._strip and text:
            self._strip = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def _end_byte_run(self):
        data, self._byte_run = self._byte_run, bytearray()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(data)


def id_list(ids):
    """`ids` (a list, tuple, numpy array or other iterable of ids) as a list."""
    if isinstance(ids, list):
        return ids
    if isinstance(ids, numpy.ndarray):
        return ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not is_iterable(ids):
        raise TypeError(f"ids must be a sequence of token ids, got {quote(ids, 60)}")
    return list(ids)
