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
  hf_files.py     Hugging Face tokenizer.json (and GPT-2's vocab.json + merges.txt) in and out
"""
