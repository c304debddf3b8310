"""Byte-level BPE.

  bpe.py       BPETokenizer: training, encoding, decoding and its own file format
  hf_files.py  Hugging Face tokenizer.json (and GPT-2's vocab.json + merges.txt) in and out
"""
