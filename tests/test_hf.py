"""Tests for xpmodel.hf.convert and the tokenizer import in xpmodel.tokenizer.hf_import.

Everything is built locally from tiny random models: an xpmodel GPT exported
and loaded by transformers (keys, logits, tokenizer ids, greedy generation),
transformers models saved and imported (one file, shards, bfloat16, GPT-2's
byte-token order, padded vocab), the exact round trip, and each refusal.
"""
import json
import shutil

import numpy
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from xpmodel.errors import DataError, UsageError, XpmodelError  # noqa: E402
from xpmodel.hf.convert import export_hf, import_hf  # noqa: E402
from xpmodel.model.gpt import GPT, GPTConfig  # noqa: E402
from xpmodel.tokenizer.bpe import ENDOFTEXT, BPETokenizer  # noqa: E402
from xpmodel.tokenizer.hf_export import export_tokenizer_hf  # noqa: E402
from xpmodel.tokenizer.hf_forms import gpt2_byte_to_unicode  # noqa: E402
from xpmodel.tokenizer.hf_import import import_hf_tokenizer, read_hf_tokenizer  # noqa: E402

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\nAll:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and "
    "we'll have corn at our own price.\nIs't a verdict?\n"
) * 3
TEXTS = ["First Citizen: speak, speak.", "We know't, we know't!\n\nAll:",
         "naïve café 🎉 and 3.14", f"before{ENDOFTEXT}after", "  runs   of\tspaces\n"]
TOKENIZER_VOCAB = 300
PADDED_VOCAB = 320          # the tokenizer's 300 ids rounded up to a multiple of 64
BLOCK = 32


@pytest.fixture(scope="module")
def tokenizer():
    tok = BPETokenizer.train(CORPUS, TOKENIZER_VOCAB)
    assert tok.vocab_size == TOKENIZER_VOCAB
    return tok


@pytest.fixture(scope="module")
def model():
    config = GPTConfig(vocab_size=PADDED_VOCAB, block_size=BLOCK, n_layer=2, n_head=2,
                       n_embd=32, dropout=0.1)
    return randomized(GPT(config, seed=3), seed=4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tokenizer):
    directory = tmp_path_factory.mktemp("exported")
    export_hf(model, tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def hf_exported(exported):
    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(exported,
                                                                   output_loading_info=True)
    return hf_model.eval(), info


def randomized(model, seed):
    """Every parameter random (biases and LayerNorms too), so a misplaced tensor shows."""
    rng = numpy.random.default_rng(seed)
    for name, view in model.params.items():
        noise = rng.normal(0.0, 0.1, size=view.shape)
        view[...] = 1.0 + noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) \
            else noise
    return model.eval()


def hf_random_model(vocab_size, seed, n_embd=32, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=BLOCK, n_embd=n_embd,
                                     n_layer=2, n_head=2, bos_token_id=TOKENIZER_VOCAB - 1,
                                     eos_token_id=TOKENIZER_VOCAB - 1, **overrides)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return hf_model


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def relative_error(ours, theirs):
    return float(numpy.abs(ours - theirs).max() / numpy.abs(theirs).max())


def random_prompts(seed, high):
    rng = numpy.random.default_rng(seed)
    return [rng.integers(0, high, size=(2, T)) for T in (1, 5, BLOCK)]


def greedy(model, prompt, max_new_tokens, stop_id):
    """Uncached greedy decoding with GPT.forward; includes stop_id and ends there,
    as transformers' generate does."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        window = numpy.array([ids[-model.config.block_size:]])
        next_id = int(model.forward(window)[0, -1].argmax())
        ids.append(next_id)
        if next_id == stop_id:
            break
    return ids


def hf_greedy(hf_model, prompt, max_new_tokens):
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[0].tolist()


def xp_model(config, arrays):
    model = GPT(config)
    model.load_state_arrays(arrays)
    return model.eval()


# ----- export ---------------------------------------------------------------


def test_export_loads_in_transformers_without_missing_or_unexpected_keys(
        exported, hf_exported, tokenizer):
    hf_model, info = hf_exported
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert hf_model.config.vocab_size == PADDED_VOCAB          # padded rows are kept
    assert hf_model.config.n_positions == BLOCK
    assert hf_model.config.bos_token_id == hf_model.config.eos_token_id == tokenizer.eot_id
    assert hf_model.generation_config.pad_token_id == tokenizer.eot_id
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_inner"] is None
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1


def test_exported_logits_match(model, hf_exported):
    hf_model, _ = hf_exported
    for ids in random_prompts(seed=0, high=PADDED_VOCAB):
        assert relative_error(model.forward(ids), hf_logits(hf_model, ids)) < 1e-4


def test_exported_tokenizer_gives_the_same_ids(exported, tokenizer):
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert auto.model_max_length == BLOCK
    for text in TEXTS:
        ids = tokenizer.encode(text, allowed_special="all")
        assert auto.encode(text, add_special_tokens=False) == ids, text
        assert auto.encode(text) == ids, text   # an export adds no BOS or EOS
        assert auto.decode(ids) == text


def test_exported_greedy_generation_matches(model, hf_exported, tokenizer):
    hf_model, _ = hf_exported
    for text in TEXTS[:3]:
        prompt = tokenizer.encode(text)[:BLOCK - 20]
        ours = greedy(model, prompt, 20, tokenizer.eot_id)
        assert hf_greedy(hf_model, prompt, 20) == ours, text


def test_round_trip_is_exact(model, tokenizer, exported):
    config, arrays, tok = import_hf(exported)
    assert config == model.config
    assert tok.fingerprint() == tokenizer.fingerprint()
    expected = model.state_arrays()
    assert set(arrays) == set(expected)
    for name, value in expected.items():
        assert arrays[name].dtype == numpy.float32
        numpy.testing.assert_array_equal(arrays[name], value, err_msg=name)


def test_export_refuses_a_directory_with_other_files(model, tokenizer, exported, tmp_path):
    export_hf(model, tokenizer, tmp_path / "again")
    export_hf(model, tokenizer, tmp_path / "again")   # replacing an export is fine
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        export_hf(model, tokenizer, tmp_path / "other")


def test_export_refuses_a_model_directory_it_did_not_write(model, tokenizer, exported, tmp_path):
    assert json.loads((exported / "xpmodel_export.json").read_text())["architecture"] == \
        "GPT2LMHeadModel"
    theirs = tmp_path / "theirs"
    hf_random_model(PADDED_VOCAB, seed=7).save_pretrained(theirs, safe_serialization=True)
    export_tokenizer_hf(tokenizer, theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    with pytest.raises(UsageError, match=f"{theirs}: holds a model directory xpmodel did not "
                                         f"export .* pass --overwrite"):
        export_hf(model, tokenizer, theirs)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    export_hf(model, tokenizer, theirs, overwrite=True)
    config, _, _ = import_hf(theirs)
    assert config == model.config


def test_export_refuses_a_tokenizer_larger_than_the_vocab(tokenizer, tmp_path):
    small = GPT(GPTConfig(vocab_size=260, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(UsageError, match="300 ids"):
        export_hf(small, tokenizer, tmp_path)


def test_export_and_import_carry_mlp_width_epsilon_and_an_untied_head(tokenizer, tmp_path):
    config = GPTConfig(vocab_size=PADDED_VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                       mlp_hidden=48, norm_eps=1e-6, tie_embeddings=False)
    model = randomized(GPT(config, seed=5), seed=6)
    assert export_hf(model, tokenizer, tmp_path / "out") == "GPT2LMHeadModel"
    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (hf_model.config.n_inner, hf_model.config.layer_norm_epsilon) == (48, 1e-6)
    assert hf_model.lm_head.weight.data_ptr() != hf_model.transformer.wte.weight.data_ptr()
    for ids in random_prompts(seed=2, high=PADDED_VOCAB):
        assert relative_error(model.forward(ids), hf_logits(hf_model.eval(), ids)) < 1e-4
    imported, arrays, _ = import_hf(tmp_path / "out")
    assert imported == config
    for name, value in model.state_arrays().items():
        numpy.testing.assert_array_equal(arrays[name], value, err_msg=name)


# ----- import of models saved by transformers -------------------------------


def test_import_transformers_model_with_unpadded_vocab(tokenizer, tmp_path):
    hf_model = hf_random_model(TOKENIZER_VOCAB, seed=1)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    export_tokenizer_hf(tokenizer, tmp_path)
    config, arrays, tok = import_hf(tmp_path)
    assert config == GPTConfig(vocab_size=TOKENIZER_VOCAB, block_size=BLOCK, n_layer=2,
                               n_head=2, n_embd=32, dropout=0.1)
    assert tok == tokenizer
    ours = xp_model(config, arrays)
    for ids in random_prompts(seed=1, high=TOKENIZER_VOCAB):
        assert relative_error(ours.forward(ids), hf_logits(hf_model, ids)) < 1e-4


def test_import_transformers_model_with_its_own_mlp_width_and_an_untied_head(tokenizer,
                                                                            tmp_path):
    hf_model = hf_random_model(TOKENIZER_VOCAB, seed=7, n_inner=40, layer_norm_epsilon=1e-6,
                               tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    export_tokenizer_hf(tokenizer, tmp_path)
    config, arrays, _ = import_hf(tmp_path)
    assert (config.mlp_hidden, config.norm_eps, config.tie_embeddings) == (40, 1e-6, False)
    ours = xp_model(config, arrays)
    for ids in random_prompts(seed=3, high=TOKENIZER_VOCAB):
        assert relative_error(ours.forward(ids), hf_logits(hf_model, ids)) < 1e-4


def test_import_sharded_weights(tokenizer, tmp_path):
    hf_model = hf_random_model(TOKENIZER_VOCAB, seed=2)
    hf_model.save_pretrained(tmp_path / "one", safe_serialization=True)
    hf_model.save_pretrained(tmp_path / "shards", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    for name in ("one", "shards"):
        export_tokenizer_hf(tokenizer, tmp_path / name)
    _, one, _ = import_hf(tmp_path / "one")
    _, shards, _ = import_hf(tmp_path / "shards")
    for name, value in one.items():
        numpy.testing.assert_array_equal(shards[name], value, err_msg=name)


def test_import_bfloat16_weights(tokenizer, tmp_path):
    hf_model = hf_random_model(TOKENIZER_VOCAB, seed=3).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    export_tokenizer_hf(tokenizer, tmp_path)
    _, arrays, _ = import_hf(tmp_path)
    state = {name: value for name, value in hf_model.transformer.state_dict().items() if name in arrays}
    assert set(state) == set(arrays)          # every imported array is checked below
    for name, value in state.items():
        numpy.testing.assert_array_equal(arrays[name], value.float().numpy(), err_msg=name)


def test_import_accepts_unprefixed_keys_buffers_and_a_tied_head(model, tokenizer, exported,
                                                                tmp_path):
    from safetensors.numpy import save_file
    shutil.copytree(exported, tmp_path, dirs_exist_ok=True)
    arrays = model.state_arrays()
    tensors = {name: value.astype(numpy.float32) for name, value in arrays.items()}
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    for i in range(model.config.n_layer):   # causal-mask buffers of older checkpoints
        tensors[f"h.{i}.attn.bias"] = numpy.tril(numpy.ones((1, 1, BLOCK, BLOCK), numpy.float32))
        tensors[f"h.{i}.attn.masked_bias"] = numpy.array(-1e4, dtype=numpy.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _, imported, _ = import_hf(tmp_path)
    for name, value in arrays.items():
        numpy.testing.assert_array_equal(imported[name], value, err_msg=name)


# ----- GPT-2's byte-token order and a padded vocab --------------------------


def write_gpt2_ordered(source, target, keep):
    """Rewrite an xpmodel tokenizer export with GPT-2's id order for the 256
    byte tokens (printable bytes first, as the bytes-to-unicode table lists
    them: "!" is id 0). keep: which of tokenizer.json / vocab.json to leave."""
    byte_to_char = gpt2_byte_to_unicode()
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    names = sorted(vocab, key=vocab.get)
    byte_names = sorted(names[:256], key=ord)   # GPT-2's order is the table's code points
    reordered = {name: i for i, name in enumerate(byte_names + names[256:])}
    assert reordered[byte_to_char[ord("!")]] == 0 and reordered[byte_to_char[ord(" ")]] == 220
    target.mkdir(exist_ok=True)
    for name in ("merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    if keep == "tokenizer.json":
        document = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
        document["model"]["vocab"] = reordered
        (target / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False),
                                               encoding="utf-8")
    else:
        (target / "vocab.json").write_text(json.dumps(reordered, ensure_ascii=False),
                                           encoding="utf-8")
    return reordered


@pytest.mark.parametrize("keep", ["tokenizer.json", "vocab.json"])
def test_import_gpt2_byte_order_with_padded_vocab(tokenizer, exported, tmp_path, keep):
    write_gpt2_ordered(exported, tmp_path, keep)
    hf_model = hf_random_model(PADDED_VOCAB, seed=5)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)

    tok, hf_ids = read_hf_tokenizer(tmp_path)
    assert tok == tokenizer and import_hf_tokenizer(tmp_path) == tokenizer
    assert hf_ids[ord("!")] == 0 and hf_ids[ord(" ")] == 220
    assert list(hf_ids[256:]) == list(range(256, TOKENIZER_VOCAB))   # merges, specials stay
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert auto.encode(text) == hf_ids[ids].tolist(), text

    config, arrays, _ = import_hf(tmp_path)
    assert config.vocab_size == PADDED_VOCAB and tok.vocab_size == TOKENIZER_VOCAB
    ours = xp_model(config, arrays)
    column = numpy.concatenate([hf_ids, numpy.arange(TOKENIZER_VOCAB, PADDED_VOCAB)])
    for text in TEXTS:
        ids = numpy.array([tok.encode(text, allowed_special="all")])
        theirs = hf_logits(hf_model, hf_ids[ids])
        assert relative_error(ours.forward(ids), theirs[..., column]) < 1e-4, text
        prompt = ids[0].tolist()[:BLOCK - 20]
        generated = greedy(ours, prompt, 20, tok.eot_id)
        assert hf_greedy(hf_model, hf_ids[prompt].tolist(), 20) == column[generated].tolist()


def test_gpt2_ordered_import_exports_in_xpmodel_order(tokenizer, exported, tmp_path):
    write_gpt2_ordered(exported, tmp_path / "gpt2", "tokenizer.json")
    hf_random_model(PADDED_VOCAB, seed=6).save_pretrained(tmp_path / "gpt2",
                                                          safe_serialization=True)
    config, arrays, tok = import_hf(tmp_path / "gpt2")
    ours = xp_model(config, arrays)
    export_hf(ours, tok, tmp_path / "again")
    hf_again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    ids = [tok.encode(text) for text in TEXTS[:2]]
    assert [auto.encode(text) for text in TEXTS[:2]] == ids
    for row in ids:
        row = numpy.array([row])
        assert relative_error(ours.forward(row), hf_logits(hf_again, row)) < 1e-4
    _, arrays_again, tok_again = import_hf(tmp_path / "again")
    assert tok_again == tok
    for name, value in arrays.items():
        numpy.testing.assert_array_equal(arrays_again[name], value, err_msg=name)


# ----- refusals -------------------------------------------------------------


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def copy_of_export(exported, tmp_path):
    shutil.copytree(exported, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.mark.parametrize("changes, name", [
    (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"), "Qwen3ForCausalLM"),
    (dict(architectures=[], model_type="qwen3"), "model_type 'qwen3'"),
    (dict(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM with model_type 'gpt2'"),
    (dict(architectures=["LlamaForCausalLM"], model_type="mistral"),
     r"model_type 'mistral' \(LlamaForCausalLM\) is not supported"),
    (dict(architectures=["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
])
def test_import_refuses_other_architectures(copy_of_export, changes, name):
    edit_config(copy_of_export, **changes)
    with pytest.raises(UsageError, match=name):
        import_hf(copy_of_export)


@pytest.mark.parametrize("changes, feature", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"activation_function": "gelu"}, "activation_function"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
])
def test_import_refuses_unsupported_config_features(copy_of_export, changes, feature):
    edit_config(copy_of_export, **changes)
    with pytest.raises(UsageError, match=feature):
        import_hf(copy_of_export)


@pytest.mark.parametrize("key, digits, named", [
    ("layer_norm_epsilon", 1000, "'layer_norm_epsilon' is an integer of 3,319 bits"),
    ("resid_pdrop", 100, "'resid_pdrop' is an integer of 330 bits"),
    ("n_layer", 30, "'n_layer' is an integer of 97 bits"),
    ("rope_scaling", 30, r"'rope_scaling.factor\[1\]' is an integer of 97 bits"),
    ("n_embd", 5000, "Hugging Face config is not valid JSON"),   # past Python's int parsing
])
def test_import_refuses_huge_integers_naming_config_json(copy_of_export, key, digits, named):
    path = copy_of_export / "config.json"
    value = "1" * digits
    if key == "rope_scaling":
        value = '{"factor": [1, %s]}' % value
    path.write_text(path.read_text().rstrip()[:-1] + f', "{key}": {value}}}')   # as the last key: it wins
    with pytest.raises(DataError, match="config.json: " + named) as info:
        import_hf(copy_of_export)
    assert "\n" not in str(info.value)


def test_import_accepts_gelu_pytorch_tanh(copy_of_export):
    edit_config(copy_of_export, activation_function="gelu_pytorch_tanh", n_inner=128)
    config, arrays, _ = import_hf(copy_of_export)
    assert config.mlp == "gelu" and config.mlp_hidden == 128     # the tanh GELU xpmodel computes
    assert arrays["h.0.mlp.c_fc.weight"].shape == (config.n_embd, 128)


def test_import_refuses_pickled_weights_without_opening_them(copy_of_export):
    (copy_of_export / "model.safetensors").unlink()
    (copy_of_export / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UsageError, match="never unpickles") as info:
        import_hf(copy_of_export)
    assert "safe_serialization=True" in str(info.value)


def test_import_refuses_a_head_that_its_config_ties_or_lacks(model, copy_of_export):
    from safetensors.numpy import save_file
    tensors = {"transformer." + name: value.astype(numpy.float32)
               for name, value in model.state_arrays().items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, str(copy_of_export / "model.safetensors"))
    with pytest.raises(UsageError, match="lm_head.weight differs.*tie_word_embeddings true"):
        import_hf(copy_of_export)
    del tensors["lm_head.weight"]
    save_file(tensors, str(copy_of_export / "model.safetensors"))
    edit_config(copy_of_export, tie_word_embeddings=False)
    with pytest.raises(DataError, match="lack lm_head.weight"):
        import_hf(copy_of_export)


def test_import_refuses_extra_and_missing_tensors(model, copy_of_export):
    from safetensors.numpy import save_file
    tensors = {"transformer." + name: value.astype(numpy.float32)
               for name, value in model.state_arrays().items()}
    tensors["score.weight"] = numpy.zeros((2, 32), numpy.float32)
    save_file(tensors, str(copy_of_export / "model.safetensors"))
    with pytest.raises(UsageError, match="score.weight"):
        import_hf(copy_of_export)
    del tensors["score.weight"]
    add_empty_tensors(copy_of_export / "model.safetensors", ["score." + "x" * 100_000])
    with pytest.raises(UsageError) as refusal:   # a name the file holds is cut in the message
        import_hf(copy_of_export)
    assert "score.xxx" in str(refusal.value) and len(str(refusal.value)) < 500
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(copy_of_export / "model.safetensors"))
    with pytest.raises(DataError, match="h.1.mlp.c_fc.bias"):
        import_hf(copy_of_export)


def test_import_refuses_a_shape_that_disagrees_with_the_config(copy_of_export):
    edit_config(copy_of_export, n_positions=64)
    with pytest.raises(DataError, match="wpe.weight"):
        import_hf(copy_of_export)


def add_empty_tensors(path, names, dtype="F32"):
    """Append zero-size entries (of `dtype`) called `names` to the header of the
    safetensors file `path`, all at the end of its data (where a file of
    200,000 of them takes seconds to write with safetensors)."""
    import struct
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    header.update({name: {"dtype": dtype, "shape": [0], "data_offsets": [len(data)] * 2}
                   for name in names})
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("empty_names, named", [
    (lambda n: [f"z{i}" for i in range(n)], "n_layer is 20,000 but the weights hold layers 0..1$"),
    (lambda n: [f"transformer.h.{i}.ln_1.weight" for i in range(2, n)],
     r"the weights lack transformer\.h\.2\.ln_1\.bias, "),
])
def test_import_refuses_a_layer_count_the_weights_do_not_hold_before_building_its_names(
        copy_of_export, empty_names, named):
    """n_layer 20,000 over a header of ~20,000 empty tensors: the names and
    shapes of 20,000 layers (~12 tensors each) were built before any was
    compared with the file, ~120 times the file's size in memory."""
    import tracemalloc
    layers = 20_000
    add_empty_tensors(copy_of_export / "model.safetensors", empty_names(layers))
    edit_config(copy_of_export, n_layer=layers)
    size = (copy_of_export / "model.safetensors").stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=named):
            import_hf(copy_of_export)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * size, (peak, size)


@pytest.mark.parametrize("n_layer, rename, named", [
    (1, None, "n_layer is 1 but the weights hold layers 0..1$"),
    (3, None, "n_layer is 3 but the weights hold layers 0..1$"),
    (2, ("transformer.h.1.", "transformer.h.5."),
     r"n_layer is 2 but the weights hold 2 layers numbered up to 5 \(none numbered 1\)$"),
    (1, ("transformer.h.", "transformer.blocks."), "n_layer is 1 but the weights hold no layers$"),
])
def test_import_names_the_layers_the_weights_hold_when_n_layer_differs(model, copy_of_export,
                                                                       n_layer, rename, named):
    from safetensors.numpy import save_file
    tensors = {"transformer." + name: value.astype(numpy.float32)
               for name, value in model.state_arrays().items()}
    if rename is not None:
        tensors = {name.replace(*rename): value for name, value in tensors.items()}
    save_file(tensors, str(copy_of_export / "model.safetensors"))
    edit_config(copy_of_export, n_layer=n_layer)
    with pytest.raises(DataError, match="config.json: " + named):
        import_hf(copy_of_export)


@pytest.mark.parametrize("rates, named", [
    ({"attn_pdrop": float("nan")}, "attn_pdrop must be a finite number in \\[0, 1\\), got nan"),
    ({"attn_pdrop": -5}, "attn_pdrop must be a finite number in \\[0, 1\\), got -5"),
    ({"embd_pdrop": float("-inf")}, "embd_pdrop must be a finite number .*, got -inf"),
    ({"resid_pdrop": 1.0, "attn_pdrop": 2.0}, "resid_pdrop must be a finite number .*, got 1.0"),
    ({"attn_pdrop": "0.1"}, "attn_pdrop must be a finite number .*, got '0.1'"),
])
def test_import_checks_each_dropout_rate_by_its_own_key(copy_of_export, rates, named):
    edit_config(copy_of_export, **rates)
    with pytest.raises(DataError, match="config.json: " + named):
        import_hf(copy_of_export)


def test_import_takes_the_largest_dropout_rate(copy_of_export):
    edit_config(copy_of_export, resid_pdrop=0.0, embd_pdrop=0.05, attn_pdrop=0.2)
    assert import_hf(copy_of_export)[0].dropout == 0.2


@pytest.mark.parametrize("changes, named", [
    ({"activation_function": "x" * 10**6}, "activation_function 'xxx"),
    ({"architectures": "x" * 10**6}, "architectures must be a list, got 'xxx"),
    ({"model_type": "x" * 10**6}, "model_type 'xxx"),
    ({"model_type": "qwen3", "architectures": ["x" * 10**6]}, "model_type 'qwen3' \\(xxx"),
    ({"architectures": ["x" * 10**6]}, "xxx"),
])
def test_import_cuts_a_long_config_value_in_its_message(copy_of_export, changes, named):
    edit_config(copy_of_export, **changes)
    with pytest.raises(XpmodelError, match=named) as info:
        import_hf(copy_of_export)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("edit, feature", [
    (lambda doc: doc["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda doc: doc.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
    (lambda doc: doc.update(pre_tokenizer={"type": "Metaspace"}), "Metaspace"),
    (lambda doc: doc["model"].update(type="WordPiece"), "WordPiece"),
    (lambda doc: doc["added_tokens"][0].update(special=False), "not special"),
])
def test_tokenizer_import_refuses_what_changes_ids(copy_of_export, edit, feature):
    path = copy_of_export / "tokenizer.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UsageError, match=feature):
        import_hf_tokenizer(copy_of_export)


def test_tokenizer_import_refuses_a_vocab_without_byte_tokens(copy_of_export):
    path = copy_of_export / "tokenizer.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    vocab = document["model"]["vocab"]
    vocab["zzz"] = vocab.pop("Ā")   # byte 0's token renamed
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UsageError, match="byte 0"):
        import_hf_tokenizer(copy_of_export)


@pytest.mark.parametrize("merges, named", [
    (5, "BPE merges is 5, not a list of merges"),
    ({"a b": 0}, "BPE merges is {'a b': 0}, not a list of merges"),
    ("a b", "BPE merges is 'a b', not a list of merges"),
    ([["a", "b", "c"]], r"merge 0 is \['a', 'b', 'c'\], not a pair of tokens"),
    ([7], "merge 0 is 7, not a pair of tokens"),
    ([["a", 7]], r"merge 0 is \['a', 7\], not a pair of tokens"),
])
def test_tokenizer_import_refuses_merges_that_are_not_a_list_of_pairs(copy_of_export, merges,
                                                                       named):
    path = copy_of_export / "tokenizer.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["model"]["merges"] = merges
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer.json: " + named) as info:
        import_hf_tokenizer(copy_of_export)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("added, named", [
    ("abc", "added_tokens is 'abc', not a list of tokens"),
    ([5], "added token 0 is 5, not an object"),
])
def test_tokenizer_import_refuses_added_tokens_that_are_not_a_list_of_objects(copy_of_export,
                                                                              added, named):
    path = copy_of_export / "tokenizer.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["added_tokens"] = added
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer.json: " + named):
        import_hf_tokenizer(copy_of_export)


@pytest.mark.parametrize("token_id, named", [("abc", "'abc'"), ("9" * 5000, "'99999.*\\.\\.\\.'")])
def test_tokenizer_import_names_an_added_tokens_decoder_id_that_is_no_number(copy_of_export,
                                                                             token_id, named):
    (copy_of_export / "tokenizer.json").unlink()   # vocab.json and tokenizer_config.json are read
    path = copy_of_export / "tokenizer_config.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["added_tokens_decoder"] = {token_id: {"content": "<|x|>", "special": True}}
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(UsageError, match=f"added token '<\\|x\\|>' with id {named} is malformed$"):
        import_hf_tokenizer(copy_of_export)


@pytest.mark.parametrize("kind, named", [("fifo", "is a FIFO"), ("folder", "is a directory"),
                                         ("dangling link", "no such tokenizer file")])
def test_a_tokenizer_json_that_is_no_file_is_refused_not_passed_over(copy_of_export, kind, named):
    # vocab.json and merges.txt are there too: the fast tokenizers would still
    # read tokenizer.json, so falling back to them could change the ids.
    import os
    path = copy_of_export / "tokenizer.json"
    path.unlink()
    {"fifo": os.mkfifo, "folder": os.mkdir,
     "dangling link": lambda p: os.symlink(copy_of_export / "missing.json", p)}[kind](path)
    assert (copy_of_export / "vocab.json").is_file()
    with pytest.raises(DataError, match=f"tokenizer.json: {named}") as info:
        import_hf_tokenizer(copy_of_export)
    assert "\n" not in str(info.value)
