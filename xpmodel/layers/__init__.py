"""Hand-written layers: each file pairs a forward with its backward.

Conventions shared by every layer:
  B batch, T time (sequence length), C channels (n_embd), H heads,
  D head size (C // H), V vocabulary, N = B*T rows of a 2-D activation.
Forward functions return their output and, where backward needs one, a
cache holding exactly what backward reads. Backward functions take the
upstream gradient `dout` first, then the cache, then the gradient buffers
they *add* into (zeroing them is the caller's job), and return the gradient
with respect to their input.
"""
