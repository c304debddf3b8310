"""Llama-family interop and the PyTorch reference of the architecture options.

Everything is built offline from tiny random models:
- tools/torch_gpt.py against a NumPy forward written independently here
  (heads in a loop, RoPE as complex rotations), for each option and for all
  together; and against transformers' own LlamaForCausalLM and
  Qwen3ForCausalLM (for QK-norm), whose weights reach xpmodel's names by
  the import mapping of xpmodel/hf/llama.py — so the mapping is checked
  without xpmodel's model code;
- an xpmodel GPT with Llama's options exported and loaded by transformers
  (keys, logits, greedy generation), Llama directories saved by
  transformers imported (one file, shards, GPT-2's byte-token order), the
  exact round trip, the refusals, an export that fails half-way, and the
  command line (import-hf, sample, export-hf, train --init-from).
"""
import errno
import json
import math
import shutil
import time
from dataclasses import replace

import numpy
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from torch_gpt import torch_forward, torch_params  # noqa: E402
from xpmodel.tokenizer.hf_export import export_tokenizer_hf  # noqa: E402
from xpmodel.hf import convert as hf  # noqa: E402
from xpmodel.hf import llama as hf_llama  # noqa: E402
from xpmodel.tokenizer.hf_import import read_hf_tokenizer  # noqa: E402
from xpmodel import atomic  # noqa: E402
from xpmodel.errors import DataError, UsageError, XpmodelError  # noqa: E402
from xpmodel.model.generate import generate  # noqa: E402
from xpmodel.hf.convert import export_hf, import_hf  # noqa: E402
from xpmodel.model.gpt import GPT  # noqa: E402
from xpmodel.model.config import GPTConfig  # noqa: E402
from xpmodel.model.params import is_norm_weight, parameter_shapes  # noqa: E402
from xpmodel.tokenizer.bpe import BPETokenizer  # noqa: E402

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
          "resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the "
          "people.\n") * 3
TEXTS = ["First Citizen: speak, speak.", "You are all resolved!\n\nAll:", "naïve café 🎉 3.14"]
TOKENIZER_VOCAB = 300
PADDED_VOCAB = 320
BLOCK = 32
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")


def relative_error(ours, theirs):
    ours, theirs = numpy.asarray(ours, numpy.float64), numpy.asarray(theirs, numpy.float64)
    return float(numpy.abs(ours - theirs).max() / numpy.abs(theirs).max())


def random_arrays(config, seed):
    """name -> float64 array for every parameter; norm weights near 1."""
    rng = numpy.random.default_rng(seed)
    return {name: (1.0 if is_norm_weight(name) else 0.0) + rng.normal(0.0, 0.2, shape)
            for name, shape in parameter_shapes(config)}


def numpy_forward(P, idx, c):
    """Logits (B, T, V) of config `c`, written apart from tools/torch_gpt.py: a
    loop over batch rows and heads, RoPE as the complex rotation of the pairs
    (j, j + D/2), query head h reading kv head h // (H / H_kv)."""
    B, T = idx.shape
    C, H, Hkv, F = c.n_embd, c.n_head, c.kv_heads, c.mlp_width
    D = C // H

    def norm(x, name):
        if c.norm == "rmsnorm":
            return rms(x, P[name + ".weight"])
        centred = x - x.mean(-1, keepdims=True)
        scaled = centred / numpy.sqrt((centred ** 2).mean(-1, keepdims=True) + c.norm_eps)
        return scaled * P[name + ".weight"] + P.get(name + ".bias", 0.0)

    def rms(x, weight):
        return x / numpy.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * weight

    def linear(x, name):
        return x @ P[name + ".weight"] + P.get(name + ".bias", 0.0)

    def rotary(x):   # (T, D)
        z = x[:, :D // 2] + 1j * x[:, D // 2:]
        z = z * numpy.exp(1j * numpy.arange(T)[:, None] * c.rope_theta ** (-2 * numpy.arange(D // 2) / D))
        return numpy.concatenate([z.real, z.imag], axis=-1)

    x = P["wte.weight"][idx] + (P["wpe.weight"][:T] if c.position == "learned" else 0.0)
    future = numpy.triu(numpy.ones((T, T), bool), 1)
    for i in range(c.n_layer):
        p = f"h.{i}."
        qkv = linear(norm(x, p + "ln_1"), p + "attn.c_attn")
        y = numpy.zeros((B, T, C))
        for b in range(B):
            for h in range(H):
                g = h // (H // Hkv)
                q = qkv[b, :, h * D:(h + 1) * D]
                k = qkv[b, :, (H + g) * D:(H + g + 1) * D]
                v = qkv[b, :, (H + Hkv + g) * D:(H + Hkv + g + 1) * D]
                if c.qk_norm:
                    q, k = rms(q, P[p + "attn.q_norm.weight"]), rms(k, P[p + "attn.k_norm.weight"])
                if c.position == "rope":
                    q, k = rotary(q), rotary(k)
                scores = numpy.where(future, -numpy.inf, q @ k.T / math.sqrt(D))
                weights = numpy.exp(scores - scores.max(-1, keepdims=True))
                y[b, :, h * D:(h + 1) * D] = weights / weights.sum(-1, keepdims=True) @ v
        x = x + linear(y, p + "attn.c_proj")
        u = linear(norm(x, p + "ln_2"), p + "mlp.c_fc")
        if c.mlp == "gelu":
            u = 0.5 * u * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        elif c.mlp == "relu2":
            u = numpy.maximum(u, 0.0) ** 2
        else:
            u = u[..., :F] / (1 + numpy.exp(-u[..., :F])) * u[..., F:]
        x = x + linear(u, p + "mlp.c_proj")
    return norm(x, "ln_f") @ P.get("lm_head.weight", P["wte.weight"]).T


OPTION_SETS = {
    "gpt2": {},
    "rmsnorm": dict(norm="rmsnorm", norm_eps=1e-6),
    "rope": dict(position="rope", rope_theta=100.0),
    "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2", mlp_hidden=40),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "llama": dict(LLAMA, n_kv_head=2, bias=False, tie_embeddings=False),
    "all": dict(LLAMA, qk_norm=True, n_kv_head=2, bias=False, tie_embeddings=False, norm_eps=1e-6),
    "layernorm_relu2_rope_qk": dict(bias=False, mlp="relu2", position="rope", qk_norm=True,
                                    n_kv_head=1),
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_torch_reference_matches_an_independent_forward(name, fused):
    config = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=32,
                       **OPTION_SETS[name])
    arrays = random_arrays(config, seed=1)
    idx = numpy.random.default_rng(2).integers(0, 40, (2, 11))
    ours = torch_forward(torch_params(arrays, torch.float64), torch.tensor(idx), config,
                         fused_attention=fused).detach().numpy()
    assert relative_error(ours, numpy_forward(arrays, idx, config)) < 1e-12


@pytest.mark.parametrize("name", ["gpt2", "all"])
def test_torch_reference_out_in_layout_gives_the_same_logits(name):
    config = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=32,
                       **OPTION_SETS[name])
    arrays = random_arrays(config, seed=4)
    idx = torch.tensor([[3, 1, 4, 1, 5, 9]])
    torch.testing.assert_close(
        torch_forward(torch_params(arrays, torch.float64, out_in=True), idx, config, out_in=True),
        torch_forward(torch_params(arrays, torch.float64), idx, config), rtol=1e-12, atol=1e-13)


def test_torch_reference_keeps_the_gpt2_call():
    config = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=32)
    params = torch_params(random_arrays(config, seed=3), torch.float64)
    idx = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(torch_forward(params, idx, 2, 4), torch_forward(params, idx, config),
                               rtol=0, atol=0)


# ----- the import mapping against transformers' own models ------------------


def hf_random_llama(seed, tied=False, bias=False, vocab=PADDED_VOCAB, kind="llama", **overrides):
    """A tiny LlamaForCausalLM (or Qwen3ForCausalLM) with every weight random."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
                 rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied,
                 attention_bias=bias, bos_token_id=TOKENIZER_VOCAB - 1,
                 eos_token_id=TOKENIZER_VOCAB - 1, **overrides)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **sizes))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=bias, **sizes))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def mapped(hf_model, qk_norm=False):
    """(GPTConfig, xpmodel name -> float64 array) by hf_llama's mapping of config.json and tensors."""
    document = hf_model.config.to_dict()
    config = GPTConfig(**dict(hf_llama.config_fields(document, "config.json"), qk_norm=qk_norm))
    state = {key: value.detach().double().numpy() for key, value in hf_model.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    arrays = {}
    if qk_norm:   # Qwen3's names for the per-head norms
        for i in range(config.n_layer):
            for which in "qk":
                arrays[f"h.{i}.attn.{which}_norm.weight"] = state.pop(
                    f"model.layers.{i}.self_attn.{which}_norm.weight")
    arrays.update(hf.from_hf_tensors(hf_llama.tensor_table(config), state))
    assert not state and set(arrays) == {name for name, _ in parameter_shapes(config)}
    return config, arrays


def in_float64(hf_model):
    """transformers computes RMSNorm and the RoPE angles in float32 whatever the
    model's dtype; here in float64, as the reference does, so that the
    comparison can be tight."""
    for module in hf_model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, norm=module: x * torch.rsqrt(
                x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    D = hf_model.config.head_dim
    inv_freq = hf_model.config.rope_parameters["rope_theta"] ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rotary(x, position_ids):
        angles = position_ids[..., None].double() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    hf_model.model.rotary_emb.forward = rotary
    return hf_model.to(torch.float64)


@pytest.mark.parametrize("kind, tied, bias", [("llama", False, False), ("llama", True, False),
                                              ("llama", False, True), ("qwen3", False, False),
                                              ("qwen3", True, False)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_mapped_transformers_weights_give_the_same_logits_in_the_reference(kind, tied, bias,
                                                                           dtype, tol):
    hf_model = hf_random_llama(seed=7, tied=tied, bias=bias, kind=kind)
    if dtype == torch.float64:
        in_float64(hf_model)
    config, arrays = mapped(hf_model, qk_norm=kind == "qwen3")
    assert (config.n_kv_head, config.bias, config.tie_embeddings) == (2, bias, tied)
    idx = torch.tensor(numpy.random.default_rng(8).integers(0, PADDED_VOCAB, (2, BLOCK)))
    with torch.no_grad():
        theirs = hf_model(idx).logits.numpy()
        for fused in (False, True):
            ours = torch_forward(torch_params(arrays, dtype), idx, config, fused_attention=fused)
            assert relative_error(ours.numpy(), theirs) < tol


# ----- export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tok = BPETokenizer.train(CORPUS, TOKENIZER_VOCAB)
    assert tok.vocab_size == TOKENIZER_VOCAB
    return tok


def llama_config(**options):
    values = dict(LLAMA, vocab_size=PADDED_VOCAB, block_size=BLOCK, n_layer=2, n_head=4,
                  n_embd=32, n_kv_head=2, bias=False, rope_theta=500.0, norm_eps=1e-5)
    values.update(options)
    return GPTConfig(**values)


def randomized(model, seed):
    rng = numpy.random.default_rng(seed)
    for name, view in model.params.items():
        view[...] = (1.0 if is_norm_weight(name) else 0.0) + rng.normal(0.0, 0.1, view.shape)
    return model.eval()


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def hf_greedy(hf_model, prompt, max_new_tokens):
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def xp_model(config, arrays):
    model = GPT(config)
    model.load_state_arrays(arrays)
    return model.eval()


EXPORTS = {"untied": dict(tie_embeddings=False), "tied": dict(tie_embeddings=True),
           "bias": dict(bias=True, tie_embeddings=False, mlp_hidden=40, dropout=0.1),
           "mha": dict(n_kv_head=4, rope_theta=10000.0, norm_eps=1e-6)}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory, tokenizer):
    model = randomized(GPT(llama_config(**EXPORTS[request.param]), seed=3), seed=4)
    directory = tmp_path_factory.mktemp("llama") / "hf"
    assert export_hf(model, tokenizer, directory) == "LlamaForCausalLM"
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                                       output_loading_info=True)
    return model, directory, hf_model.eval(), info


def test_export_loads_as_llama_without_missing_or_unexpected_keys(exported, tokenizer):
    model, directory, hf_model, info = exported
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    cfg, hf_cfg = model.config, hf_model.config
    assert (hf_cfg.num_key_value_heads, hf_cfg.intermediate_size, hf_cfg.vocab_size) == \
        (cfg.kv_heads, cfg.mlp_width, PADDED_VOCAB)
    assert hf_cfg.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf_cfg.rms_norm_eps == cfg.norm_eps
    assert hf_cfg.attention_bias == hf_cfg.mlp_bias == cfg.bias
    assert hf_cfg.attention_dropout == 0.0   # xpmodel's dropout is not Llama's
    tied = hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert tied == cfg.tie_embeddings
    assert hf_model.generation_config.eos_token_id == tokenizer.eot_id
    assert sorted(p.name for p in directory.iterdir()) == sorted(hf.EXPORT_FILES)
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_exported_logits_and_greedy_generation_match(exported, tokenizer):
    model, _, hf_model, _ = exported
    rng = numpy.random.default_rng(0)
    for T in (1, 7, BLOCK):
        ids = rng.integers(0, PADDED_VOCAB, (2, T))
        assert relative_error(model.forward(ids), hf_logits(hf_model, ids)) < 1e-4
    for text in TEXTS:
        prompt = tokenizer.encode(text)[:BLOCK - 16]
        theirs = hf_greedy(hf_model, prompt, 16)   # ends early at eos, as ours does not
        assert list(generate(model, prompt, 16, temperature=0.0))[:len(theirs)] == theirs, text


def test_exported_tokenizer_gives_the_same_ids(exported, tokenizer):
    auto = transformers.AutoTokenizer.from_pretrained(exported[1])
    for text in TEXTS:
        assert auto.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert auto.encode(text) == tokenizer.encode(text)   # an export adds no BOS or EOS


def test_llama_round_trip_is_exact(exported, tokenizer):
    model, directory, _, _ = exported
    config, arrays, tok = import_hf(directory)
    assert config == replace(model.config, dropout=0.0)
    assert tok.fingerprint() == tokenizer.fingerprint()
    expected = model.state_arrays()
    assert set(arrays) == set(expected)
    for name, value in expected.items():
        assert arrays[name].dtype == numpy.float32
        numpy.testing.assert_array_equal(arrays[name], value, err_msg=name)


@pytest.mark.parametrize("options, named", [
    (dict(LLAMA, qk_norm=True),
     "^model.qk_norm true cannot be exported as LlamaForCausalLM, which has no QK-norm \\("),
    (dict(LLAMA, mlp="relu2"), "^model.mlp relu2 cannot be exported as LlamaForCausalLM"),
    (dict(LLAMA, mlp="gelu"), "^model.mlp gelu cannot be exported as LlamaForCausalLM, which has "
                              "a SwiGLU MLP \\("),
    (dict(position="rope"), "^model.position rope cannot be exported as GPT2LMHeadModel, which "
                            "has learned positions \\("),
    (dict(n_kv_head=2), "^model.n_kv_head 2 cannot be exported as GPT2LMHeadModel"),
    (dict(bias=False), "^model.bias false cannot be exported as GPT2LMHeadModel"),
    (dict(position="rope", mlp="relu2", qk_norm=True),
     "^model.position rope, model.mlp relu2, model.qk_norm true cannot be exported as "
     "GPT2LMHeadModel, which has learned positions, a GELU MLP and no QK-norm \\(Hugging Face"),
    (dict(LLAMA, qk_norm=True, bias=True, mlp="gelu", n_kv_head=2),
     "^model.mlp gelu, model.qk_norm true cannot be exported as LlamaForCausalLM, which has a "
     "SwiGLU MLP and no QK-norm \\("),
])
def test_export_names_the_option_it_cannot_write(options, named, tokenizer, tmp_path):
    config = GPTConfig(vocab_size=PADDED_VOCAB, block_size=16, n_layer=1, n_head=4, n_embd=16,
                       **options)
    with pytest.raises(UsageError, match=named) as info:
        export_hf(GPT(config), tokenizer, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


# ----- import of models saved by transformers -------------------------------


def save_llama(hf_model, directory, tokenizer, **kwargs):
    hf_model.save_pretrained(directory, safe_serialization=True, **kwargs)
    export_tokenizer_hf(tokenizer, directory)
    return directory


@pytest.mark.parametrize("tied", [False, True])
def test_import_transformers_llama(tokenizer, tmp_path, tied):
    hf_model = hf_random_llama(seed=11, tied=tied)
    save_llama(hf_model, tmp_path, tokenizer)
    config, arrays, tok = import_hf(tmp_path)
    assert config == llama_config(mlp_hidden=48, tie_embeddings=tied)
    assert tok == tokenizer
    ours = xp_model(config, arrays)
    rng = numpy.random.default_rng(1)
    for T in (1, 9, BLOCK):
        ids = rng.integers(0, PADDED_VOCAB, (2, T))
        assert relative_error(ours.forward(ids), hf_logits(hf_model, ids)) < 1e-4
    prompt = tokenizer.encode(TEXTS[0])
    theirs = hf_greedy(hf_model, prompt, 12)
    assert list(generate(ours, prompt, 12, temperature=0.0))[:len(theirs)] == theirs


def test_import_sharded_and_bfloat16_llama(tokenizer, tmp_path):
    hf_model = hf_random_llama(seed=12)
    save_llama(hf_model, tmp_path / "one", tokenizer)
    save_llama(hf_model, tmp_path / "shards", tokenizer, max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    _, one, _ = import_hf(tmp_path / "one")
    _, shards, _ = import_hf(tmp_path / "shards")
    for name, value in one.items():
        numpy.testing.assert_array_equal(shards[name], value, err_msg=name)
    save_llama(hf_model.to(torch.bfloat16), tmp_path / "bf16", tokenizer)
    _, half, _ = import_hf(tmp_path / "bf16")
    numpy.testing.assert_array_equal(
        half["h.1.attn.c_attn.weight"][:, :32],
        hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T)


def test_import_permutes_embedding_and_head_rows_for_gpt2_byte_order(tokenizer, tmp_path):
    from test_hf import write_gpt2_ordered
    export_dir = tmp_path / "xp"
    export_tokenizer_hf(tokenizer, export_dir)
    write_gpt2_ordered(export_dir, tmp_path / "llama", "tokenizer.json")
    hf_model = hf_random_llama(seed=13)
    hf_model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    config, arrays, tok = import_hf(tmp_path / "llama")
    _, hf_ids = read_hf_tokenizer(tmp_path / "llama")
    assert not numpy.array_equal(hf_ids, numpy.arange(len(hf_ids)))
    column = numpy.concatenate([hf_ids, numpy.arange(TOKENIZER_VOCAB, PADDED_VOCAB)])
    ours = xp_model(config, arrays)
    for text in TEXTS:
        ids = numpy.array([tok.encode(text)])
        theirs = hf_logits(hf_model, column[ids])
        assert relative_error(ours.forward(ids), theirs[..., column]) < 1e-4, text


# ----- bos and eos ----------------------------------------------------------


def sentencepiece_llama(directory):
    """A Llama folder as TinyLlama ships one: a SentencePiece BPE whose <unk>,
    <s> and </s> are ids 0, 1 and 2, config.json's bos_token_id 1 and
    eos_token_id 2, and a post_processor that puts <s> before every text."""
    from test_tokenizer_sentencepiece import in_form, sp_document
    document = in_form(sp_document(vocab_size=120), "llama2")
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    document["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    hf_model = hf_random_llama(seed=25, vocab=400)
    for config in (hf_model.config, hf_model.generation_config):
        config.bos_token_id, config.eos_token_id = 1, 2
    hf_model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.json").write_text(json.dumps(document))
    return directory


def test_a_round_trip_keeps_bos_and_eos(tmp_path):
    source = sentencepiece_llama(tmp_path / "hf")
    config, arrays, tok = import_hf(source)
    ids, its_tokenizer = hf.hf_special_ids(source)
    assert its_tokenizer == tok
    assert ids == {"bos_token_id": tok.special_tokens["<s>"],
                   "eos_token_id": tok.special_tokens["</s>"]}   # xpmodel numbers specials last
    export_hf(xp_model(config, arrays), tok, tmp_path / "back", special_ids=ids)
    for name in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "back" / name).read_text())
        assert {key: written[key] for key in ids} == ids, name
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert (auto.bos_token, auto.eos_token) == ("<s>", "</s>")
    assert hf.hf_special_ids(tmp_path / "back")[0] == ids


def test_ids_are_those_of_tokenizers_without_special_tokens(tmp_path):
    import tokenizers
    source = sentencepiece_llama(tmp_path)
    tok, hf_ids = read_hf_tokenizer(source)
    theirs = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    for text in TEXTS:
        plain = theirs.encode(text, add_special_tokens=False).ids
        assert hf_ids[tok.encode(text)].tolist() == plain, text
        assert theirs.encode(text).ids == [1] + plain   # the post_processor's <s>, left out


@pytest.mark.parametrize("eos, named", [(400, "eos_token_id 400 is not a token id"),
                                        ([], r"eos_token_id \[\] is not a token id"),
                                        ("</s>", "eos_token_id '</s>' is not a token id")])
def test_special_ids_must_be_token_ids(tmp_path, eos, named):
    source = sentencepiece_llama(tmp_path)
    edit_config(source, eos_token_id=eos)
    with pytest.raises(DataError, match=named):
        hf.hf_special_ids(source)
    tok = import_hf(source)[2]
    with pytest.raises(UsageError, match="special_ids: bos_token_id 379 is not a token id"):
        export_hf(GPT(llama_config(vocab_size=400)), tok, tmp_path / "out",
                  special_ids={"bos_token_id": 379, "eos_token_id": None})


# ----- refusals -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    return save_llama(hf_random_llama(seed=14), tmp_path_factory.mktemp("saved"), tokenizer)


@pytest.fixture
def copy_of_llama(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, error, named", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), UsageError, "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), UsageError, "yarn"),
    (dict(rope_parameters={"rope_theta": 1e4, "factor": 2.0}), UsageError, "factor"),
    (dict(partial_rotary_factor=0.5), UsageError, "partial_rotary_factor"),
    (dict(rope_scaling={"rope_type": "default", "rope_theta": 777.0}), DataError,
     "rope_scaling.rope_theta 777.0 and rope_parameters.rope_theta 500.0 disagree"),
    (dict(rope_theta=10000.0), DataError,
     "rope_theta 10000.0 and rope_parameters.rope_theta 500.0 disagree"),
    (dict(hidden_act="gelu"), UsageError, "hidden_act"),
    (dict(attention_bias=True), UsageError, "attention_bias true with mlp_bias false"),
    (dict(head_dim=16), UsageError, "head_dim 16"),
    (dict(hidden_size=-32, head_dim=8), DataError, "hidden_size must be an integer > 0, got -32"),
    (dict(hidden_size=30, head_dim=8), DataError, r"hidden_size \(30\) must be divisible"),
    (dict(pretraining_tp=2), UsageError, "pretraining_tp"),
    (dict(max_position_embeddings=1 << 40), UsageError, "max_position_embeddings"),
    (dict(num_key_value_heads=3), DataError, "num_key_value_heads"),
    (dict(num_hidden_layers=10 ** 9), DataError, "num_hidden_layers is 1,000,000,000"),
    (dict(num_hidden_layers=3), DataError,
     "num_hidden_layers is 3 but the weights hold layers 0..1$"),
    (dict(num_hidden_layers=1), DataError,
     "num_hidden_layers is 1 but the weights hold layers 0..1$"),
    (dict(intermediate_size=64), DataError, "proj.weight has shape"),
    (dict(hidden_size=10 ** 12, head_dim=None), DataError, "has shape"),
    (dict(vocab_size="many"), DataError, "vocab_size must be an integer"),
    (dict(rms_norm_eps=-1.0), DataError, "rms_norm_eps"),
    (dict(tie_word_embeddings=True), UsageError, "lm_head.weight differs"),
    (dict(architectures=["LlamaForSequenceClassification"]), UsageError,
     "LlamaForSequenceClassification"),
])
def test_import_refuses_what_xpmodel_does_not_compute(copy_of_llama, changes, error, named):
    edit_config(copy_of_llama, **changes)
    start = time.perf_counter()
    with pytest.raises(error, match=named) as info:
        import_hf(copy_of_llama)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value)


def test_import_accepts_transformers_4_rope_keys(copy_of_llama, llama_dir):
    document = json.loads((copy_of_llama / "config.json").read_text())
    theta = document.pop("rope_parameters")["rope_theta"]
    document.update(rope_theta=theta, rope_scaling=None)
    (copy_of_llama / "config.json").write_text(json.dumps(document))
    assert import_hf(copy_of_llama)[0] == import_hf(llama_dir)[0]
    edit_config(copy_of_llama, rope_parameters={"rope_type": "default", "rope_theta": theta})
    assert import_hf(copy_of_llama)[0] == import_hf(llama_dir)[0]   # the same theta twice


def test_import_leaves_attention_dropout_out(copy_of_llama):
    edit_config(copy_of_llama, attention_dropout=0.1)
    assert import_hf(copy_of_llama)[0].dropout == 0.0


def test_import_refuses_tensors_llama_does_not_have(copy_of_llama):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(copy_of_llama / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = numpy.ones(8, numpy.float32)
    save_file(tensors, str(copy_of_llama / "model.safetensors"))
    with pytest.raises(UsageError, match="q_norm.weight"):
        import_hf(copy_of_llama)


@pytest.mark.parametrize("unlisted", ["model.layers.0.self_attn.q_norm.weight", "model.norm.weight"])
def test_import_refuses_a_shard_tensor_its_index_does_not_list(tokenizer, tmp_path, unlisted):
    from safetensors.numpy import load_file, save_file
    directory = save_llama(hf_random_llama(seed=15), tmp_path, tokenizer, max_shard_size="20KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    assert list(index["weight_map"].values()).count(shard) > 1
    if unlisted in index["weight_map"]:
        del index["weight_map"][unlisted]
        index_path.write_text(json.dumps(index))
    else:
        tensors = load_file(directory / shard)
        tensors[unlisted] = numpy.ones(8, numpy.float32)
        save_file(tensors, str(directory / shard))
    with pytest.raises(DataError, match=f"{shard}: holds {unlisted}, which "
                                        f"model.safetensors.index.json does not list"):
        import_hf(directory)


@pytest.mark.parametrize("dtype, named", [(torch.int32, "I32"), (torch.float8_e4m3fn, "F8_E4M3"),
                                          (torch.float8_e5m2, "F8_E5M2")])
def test_import_names_a_dtype_it_does_not_read(copy_of_llama, dtype, named):
    from safetensors.torch import load_file, save_file
    tensors = load_file(copy_of_llama / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(copy_of_llama / "model.safetensors"))
    with pytest.raises(UsageError, match=f"{key} is {named}; xpmodel reads float tensors"):
        import_hf(copy_of_llama)


@pytest.mark.parametrize("dtype, named", [("Q99", "'Q99'"), (["F32"], "\\['F32'\\]"),
                                          ("Q" * 10**5, "'QQQ.*\\.\\.\\.'")])
def test_import_names_a_dtype_safetensors_does_not_have(copy_of_llama, dtype, named):
    from test_hf import add_empty_tensors
    add_empty_tensors(copy_of_llama / "model.safetensors", ["model.norm.extra"], dtype)
    with pytest.raises(DataError, match=f"model.safetensors: unknown dtype {named} of tensor "
                                        f"'model.norm.extra'$") as info:
        import_hf(copy_of_llama)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("kind, named", [("fifo", "is a FIFO"), ("folder", "is a directory"),
                                         ("link to /dev/zero", "is a character device"),
                                         ("dangling link", "no such safetensors file"),
                                         ("absent", "listed in model.safetensors.index.json is "
                                                    "missing")])
def test_import_names_what_a_listed_shard_is_when_it_is_no_file(tokenizer, tmp_path, kind, named):
    import os
    directory = save_llama(hf_random_llama(seed=15), tmp_path, tokenizer, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["model.norm.weight"]
    shard.unlink()
    make = {"fifo": os.mkfifo, "folder": os.mkdir,
            "link to /dev/zero": lambda p: os.symlink("/dev/zero", p),
            "dangling link": lambda p: os.symlink(directory / "gone", p), "absent": lambda p: None}
    make[kind](shard)
    start = time.perf_counter()
    with pytest.raises(DataError, match=named) as info:
        import_hf(directory)
    assert time.perf_counter() - start < 5
    assert shard.name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("changes, named", [
    (dict(hidden_act="x" * 10**6), "hidden_act 'xxx"),
    (dict(rope_scaling="x" * 10**6), "rope_scaling must be an object or null, got 'xxx"),
    (dict(rope_parameters={"rope_type": "x" * 10**6}), "rope_parameters with rope_type 'xxx"),
    (dict(rope_parameters={"x" * 10**6: 1}), "rope_parameters with 'xxx"),
    (dict(rope_theta="x" * 10**6),
     "rope_theta 'xxx.* and rope_parameters.rope_theta 500.0 disagree"),
    (dict(partial_rotary_factor="x" * 10**6), "partial_rotary_factor 'xxx"),
    (dict(pretraining_tp="x" * 10**6), "pretraining_tp 'xxx"),
    (dict(attention_bias="x" * 10**6), "attention_bias must be true or false, got 'xxx"),
    (dict(head_dim="x" * 10**6), "head_dim 'xxx"),
])
def test_import_cuts_a_long_config_value_in_its_message(copy_of_llama, changes, named):
    edit_config(copy_of_llama, **changes)
    with pytest.raises(XpmodelError, match=named) as info:
        import_hf(copy_of_llama)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("text, named", [("[" * 100_000, "nested too deeply"),
                                         (" " * (17 * 2**20), "more than")])
def test_import_refuses_a_crafted_config_json(copy_of_llama, text, named):
    (copy_of_llama / "config.json").write_text(text)
    with pytest.raises(DataError, match=named):
        import_hf(copy_of_llama)


# ----- an export is written whole or not at all -----------------------------


def full_disk(monkeypatch, fail_on):
    """Make every write of the file named `fail_on` stop part way with ENOSPC."""
    write = atomic._TargetFile.write

    def writer(self, data):
        if self._target.name == fail_on:
            write(self, bytes(memoryview(data).cast("B")[:4]))
            raise OSError(errno.ENOSPC, "No space left on device", str(self._target))
        return write(self, data)
    monkeypatch.setattr(atomic._TargetFile, "write", writer)


@pytest.mark.parametrize("fail_on", ["model.safetensors", "config.json", "tokenizer.json",
                                     "merges.txt"])
def test_export_on_a_full_disk_leaves_nothing_half_written(tokenizer, tmp_path, monkeypatch,
                                                           fail_on):
    previous = tmp_path / "previous"
    export_hf(GPT(llama_config(n_layer=1), seed=5), tokenizer, previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    full_disk(monkeypatch, fail_on)
    for out in (tmp_path / "new", previous):
        with pytest.raises(XpmodelError, match=f"cannot write {out / fail_on}: No space left"):
            export_hf(randomized(GPT(llama_config(n_layer=1)), seed=6), tokenizer, out)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_export_replaces_a_previous_export_whole(tokenizer, tmp_path):
    first, second = (randomized(GPT(llama_config(n_layer=1)), seed=s) for s in (7, 8))
    export_hf(first, tokenizer, tmp_path / "out")
    export_hf(second, tokenizer, tmp_path / "out")
    _, arrays, _ = import_hf(tmp_path / "out")
    numpy.testing.assert_array_equal(arrays["wte.weight"], second.params["wte.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        export_hf(first, tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ----- the command line -----------------------------------------------------


TRAIN = ["train.batch_size=4", "train.max_iters=4", "train.eval_interval=4", "train.eval_batches=2",
         "train.sample_interval=0", "train.warmup_iters=0", "train.save_interval=4"]


def test_cli_imports_samples_exports_and_fine_tunes_a_llama(tmp_path, tokenizer, tinyshakespeare,
                                                            capsys, monkeypatch):
    import xpmodel
    from cli_helpers import run_cli
    from xpmodel.train.rundir import RunDir
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    hf_model = hf_random_llama(seed=21)
    source = save_llama(hf_model, tmp_path / "llama", tokenizer)
    run, again, tuned = tmp_path / "run", tmp_path / "again", tmp_path / "tuned"

    code, _, err = run_cli(capsys, "import-hf", source, "--out", run)
    assert code == 0, err
    model, tok = xpmodel.load(run)
    assert model.config == llama_config(mlp_hidden=48, tie_embeddings=False) and tok == tokenizer
    ids = numpy.array([tokenizer.encode(TEXTS[0])])
    assert relative_error(model.forward(ids), hf_logits(hf_model, ids)) < 1e-4
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "First", "--temperature", "0",
                             "--max-new-tokens", "8")
    assert code == 0 and out.startswith("First"), err

    code, _, err = run_cli(capsys, "export-hf", run, again)
    assert code == 0, err
    _, exported, _ = import_hf(again)
    for name, value in model.state_arrays().items():
        numpy.testing.assert_array_equal(exported[name], value, err_msg=name)

    code, out, err = run_cli(capsys, "train", "--device", "cpu", "--quiet", "--out", tuned,
                             "--init-from", source, f"data.source={tinyshakespeare}",
                             "model.n_layer=3", "model.qk_norm=true", "model.block_size=16", *TRAIN)
    assert code == 0, err
    # rope: the shorter context is kept, and the note does not say block_size is the source's
    assert "come from the source; ignoring model.n_layer=3, model.qk_norm=true\n" in out
    tuned_model, _ = xpmodel.load(tuned)
    assert tuned_model.config == replace(model.config, block_size=16)
    saved = RunDir(tuned).load_config().model
    assert (saved.norm, saved.position, saved.mlp, saved.n_kv_head, saved.tie_embeddings) == \
        ("rmsnorm", "rope", "swiglu", 2, False)
    assert not numpy.array_equal(tuned_model.params["wte.weight"], model.params["wte.weight"])


def test_cli_names_the_option_export_cannot_write(tmp_path, capsys, monkeypatch, tinyshakespeare):
    from cli_helpers import assert_one_line_error, run_cli
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", "--device", "cpu", "--quiet", "--out", tmp_path / "run",
                           f"data.source={tinyshakespeare}", "data.tokenizer=byte",
                           "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                           "model.block_size=16", "model.qk_norm=true", "model.norm=rmsnorm",
                           "model.position=rope", "model.mlp=swiglu", *TRAIN)
    assert code == 0, err
    code, _, err = run_cli(capsys, "export-hf", tmp_path / "run", tmp_path / "hf")
    assert code == 2
    assert_one_line_error(err)
    assert "model.qk_norm true cannot be exported" in err
    assert not (tmp_path / "hf").exists()

