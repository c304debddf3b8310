"""Byte-level BPE.

  bpe.py          BPETokenizer: training, encoding and decoding, built from the files below
  pretokenize.py  text into pieces by a split regex (GPT-2's by default)
  metaspace.py    SentencePiece-style spaces: the Metaspace option and its pieces
  vocab.py        the bounds on a vocabulary, and the checks of its tokens and merges
  merging.py      one piece's ids merged by rank (encoding)
  learning.py     merges learned from a corpus (training)
  decoding.py     IncrementalDecoder: ids into text as they arrive
  file_format.py  xpmodel's tokenizer file: one JSON document
  parallel.py     encode_chunks in worker processes
  hf_forms.py     the Hugging Face forms read and written (tokenizer.json parts, GPT-2's byte table)
  hf_export.py    a BPETokenizer out as tokenizer.json, vocab.json + merges.txt and their configs
  hf_import.py    a Hugging Face BPE tokenizer directory in
"""
