"""Hugging Face interop.

  convert.py           GPT-2 and Llama model directories out of and into xpmodel
  gpt2.py, llama.py    how each family's config.json and tensors map to xpmodel's
  safetensors_file.py  the one validated safetensors reader
"""
