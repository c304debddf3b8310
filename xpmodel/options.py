"""The names of the choices a run config offers, on the ground floor.

The run config (config/) checks each setting against these lists when it
reads it, and the code that acts on the choice (a layer, a schedule, the
optimizer) dispatches on the same names; both import them from here, so the
config never imports the trainer or the model to learn what they accept.

A new choice is its name here plus its implementation where the others are:
a norm or an MLP activation in layers/block.py's tables (tests/test_imports.py
checks that they list the same names), a schedule in train/schedule.py.
"""

# model.norm (layers/block.py)
NORMS = ("layernorm", "rmsnorm")
# model.position (model/gpt.py)
POSITIONS = ("learned", "rope")
# model.mlp (layers/block.py)
MLPS = ("gelu", "swiglu", "relu2")
# train.schedule (train/schedule.py)
SCHEDULES = ("cosine", "constant", "linear", "step", "wsd")
# train.muon_adjust_lr (train/muon.py)
ADJUST_LR = ("original", "match_rms_adamw")
# train.embedding_noise_kind (layers/embedding_noise.py)
NOISE_KINDS = ("uniform", "gaussian")
# data.token_dropout_mode (data/batching.py)
TOKEN_DROPOUT_MODES = ("random", "mask")
# data.vocab_size's bound: the most ids a tokenizer may hold (tokenizer/vocab.py)
MAX_VOCAB = 1 << 20
