"""Hand-written layers: each file pairs a forward with its backward.

Conventions shared by every layer (and the model, model/gpt.py):
  B batch, T time (sequence length), C channels (n_embd), H heads, H_kv
  key/value heads (grouped-query attention), D head size (C // H), F the
  MLP's hidden width, V vocabulary, N = B*T rows of a 2-D activation.
Forward functions return their output and, where backward needs one, a
cache holding exactly what backward reads. Backward functions take the
upstream gradient `dout` first, then what they read (the cache, or the
forward's inputs where those are all it needs, as linear_backward's x and w),
then the gradient buffers they *add* into (zeroing them is the caller's
job); they return the gradient with respect to their input, except
embedding_backward, whose input is token ids.
"""
