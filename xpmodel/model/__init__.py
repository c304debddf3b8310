"""The network: embeddings -> blocks (xpmodel/layers/block.py) -> head.

  config.py    GPTConfig: the model's shape and options, and the one config-to-model function
  params.py    parameter names, shapes and their place in the flat buffers
  gpt.py       GPT: forward and backward over the flat buffers
  generate.py  sampling with a KV cache through the same blocks
"""
