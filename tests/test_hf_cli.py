"""A trained run through `xpmodel export-hf`, `import-hf` and `train --init-from`."""
import subprocess
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import xpmodel  # noqa: E402
from xpmodel.model.generate import generate  # noqa: E402

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
        "train.batch_size=4", "train.max_iters=4", "train.eval_interval=4", "train.eval_batches=2",
        "train.sample_interval=0", "train.warmup_iters=0", "train.save_interval=4", "data.tokenizer=byte"]


def xpmodel_cli(*args, env):
    result = subprocess.run([sys.executable, "-m", "xpmodel.cli.main", *args], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def xpmodel_cli_refuses(*args, env):
    """The command's one-line refusal (exit status 2)."""
    result = subprocess.run([sys.executable, "-m", "xpmodel.cli.main", *args], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.fixture
def env(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    return dict(os.environ)


def test_export_import_and_fine_tune(tmp_path, env, tinyshakespeare):
    run, hf_dir, imported, tuned = (tmp_path / n for n in ("run", "hf", "imported", "tuned"))
    xpmodel_cli("train", "--device", "cpu", "--quiet", "--out", str(run), "--config",
                "shakespeare-char-cpu", f"data.source={tinyshakespeare}", *TINY, env=env)
    xpmodel_cli("export-hf", str(run), str(hf_dir), env=env)

    model, tokenizer = xpmodel.load(run)
    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "ROMEO:\nWherefore art thou?"
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids[:16]])).logits.numpy()
    ours = model.forward(np.array([ids[:16]]))
    assert np.max(np.abs(ours - hf_logits)) / np.max(np.abs(hf_logits)) < 1e-4
    greedy = list(generate(model, ids[:4], 10, temperature=0.0))
    hf_greedy = hf_model.generate(torch.tensor([ids[:4]]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=tokenizer.eot_id)[0, 4:].tolist()
    assert greedy[:len(hf_greedy)] == hf_greedy

    xpmodel_cli("import-hf", str(hf_dir), "--out", str(imported), env=env)
    reloaded, reloaded_tokenizer = xpmodel.load(imported)
    assert reloaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    for name, value in model.params.items():
        np.testing.assert_array_equal(reloaded.params[name], value)
    sample = xpmodel_cli("sample", str(imported), "--prompt", "ROMEO:", "--temperature", "0",
                         "--max-new-tokens", "8", env=env)
    assert sample.stdout.startswith("ROMEO:")

    xpmodel_cli("train", "--device", "cpu", "--quiet", "--out", str(tuned), "--init-from",
                str(hf_dir), f"data.source={tinyshakespeare}", *TINY, env=env)
    tuned_model, _ = xpmodel.load(tuned)
    assert tuned_model.config == model.config
    assert not np.array_equal(tuned_model.params["wte.weight"], model.params["wte.weight"])

    # hf_dir is an export, but also where the imported and the tuned weights came from
    exported = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    for source_of_hf_dir in (imported, tuned):
        refusal = xpmodel_cli_refuses("export-hf", str(source_of_hf_dir), str(hf_dir), env=env)
        assert f"overlaps {hf_dir}, which the run's weights came from" in refusal
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == exported
    xpmodel_cli("export-hf", str(run), str(hf_dir), env=env)   # its own earlier export


def test_pickled_checkpoints_are_refused(tmp_path, env):
    hf_dir = tmp_path / "bin_only"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    result = subprocess.run([sys.executable, "-m", "xpmodel.cli.main", "import-hf", str(hf_dir), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "pickle" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fifo", ["config.json", "model.safetensors.index.json"])
def test_import_refuses_a_fifo_json_file_in_one_line_without_waiting(tmp_path, env, fifo):
    """A FIFO named config.json (or the shard index) is refused as one, not read:
    a read would wait forever for a writer, and `is_file` called it missing."""
    import os
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tiny_hf_dir(hf_dir)
    if fifo != "config.json":
        (hf_dir / "model.safetensors").unlink()   # the index is read only without one file
    (hf_dir / fifo).unlink(missing_ok=True)
    os.mkfifo(hf_dir / fifo)
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True,
                                       env=env, timeout=60)
    result = run("-m", "xpmodel.cli.main", "import-hf", str(hf_dir), "--out", str(tmp_path / "run"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{hf_dir / fifo}: is a FIFO, not a" in result.stderr
    result = run("-c", "import sys; from xpmodel.hf.convert import hf_special_ids\n"
                       "try: hf_special_ids(sys.argv[1])\n"
                       "except Exception as exc: print(exc)", str(hf_dir))
    if fifo == "config.json":   # the bos and eos ids that export-hf keeps
        assert result.stdout.strip() == f"{hf_dir / fifo}: is a FIFO, not a Hugging Face config file"


def tiny_hf_dir(directory):
    """A Hugging Face GPT-2 folder as `save_pretrained` leaves it (no export marker)."""
    from xpmodel.hf.convert import EXPORT_MARKER, export_hf
    from xpmodel.model.gpt import GPT, GPTConfig
    from xpmodel.tokenizer.bpe import BPETokenizer
    config = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    export_hf(GPT(config, seed=1), BPETokenizer(), directory)
    (directory / EXPORT_MARKER).unlink()
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def record_relative_sources(run, source):
    """Make `run` look as an older xpmodel left it: its import source or
    train.init_from recorded as the relative path `source`, as typed."""
    import json
    from dataclasses import replace
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from xpmodel.config import save_config
    from xpmodel.train.rundir import RunDir
    run = RunDir(run)
    config = run.load_config()
    if config.train.init_from:
        save_config(replace(config, train=replace(config.train, init_from=source)),
                    run.config_path)
    step0 = run.step_path(0)
    if step0.exists():
        with safe_open(step0, "np") as file:
            meta = json.loads(file.metadata()["xpmodel"])
    if step0.exists() and meta["kind"] == "imported":
        save_file(load_file(step0), str(step0),
                  metadata={"xpmodel": json.dumps(dict(meta, source=source))})


def test_export_refuses_a_source_named_by_a_relative_path(tmp_path, monkeypatch, capsys,
                                                          tinyshakespeare):
    from cli_helpers import assert_one_line_error, run_cli
    from xpmodel.train.rundir import RunDir
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    original = tiny_hf_dir(work / "gpt")
    monkeypatch.chdir(work)
    assert run_cli(capsys, "import-hf", "gpt", "--out", "runs/imported")[0] == 0
    code, _, err = run_cli(capsys, "train", "--device", "cpu", "--quiet", "--out", "runs/tuned",
                           "--init-from", "gpt", f"data.source={tinyshakespeare}", *TINY)
    assert code == 0, err
    assert RunDir("runs/tuned").load_config().train.init_from == str(work / "gpt")

    monkeypatch.chdir(tmp_path)   # another working directory than the runs were made from
    for run in ("imported", "tuned"):
        for overwrite in ([], ["--overwrite"]):   # the reason, not a flag that cannot help
            code, _, err = run_cli(capsys, "export-hf", f"work/runs/{run}", "work/gpt", *overwrite)
            assert code == 2
            assert_one_line_error(err)
            assert f"overlaps {work / 'gpt'}, which the run's weights came from" in err
        # an older xpmodel recorded "gpt" as typed: any folder ending in it may be the source
        record_relative_sources(work / "runs" / run, "gpt")
        for target in ("work/gpt", "elsewhere/gpt", "work/gpt/inside"):
            code, _, err = run_cli(capsys, "export-hf", f"work/runs/{run}", target, "--overwrite")
            assert code == 2 and "overlaps gpt, which the run's weights came from (recorded as " \
                                 "a relative path" in err, err
        assert run_cli(capsys, "export-hf", f"work/runs/{run}", f"out-{run}")[0] == 0
    assert {p.name: p.read_bytes() for p in (work / "gpt").iterdir()} == original


def test_export_keeps_the_bos_and_eos_of_the_imported_model(tmp_path, monkeypatch, capsys,
                                                            tinyshakespeare):
    import json
    from cli_helpers import run_cli
    from test_hf_llama import sentencepiece_llama
    from xpmodel.hf.convert import hf_special_ids
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    source = sentencepiece_llama(tmp_path / "hf")
    expected, _ = hf_special_ids(source)
    train = ["--device", "cpu", "--quiet", f"data.source={tinyshakespeare}", *TINY[4:-1]]
    assert run_cli(capsys, "import-hf", source, "--out", tmp_path / "imported")[0] == 0
    for run, init_from in (("tuned", source), ("tuned_imported", tmp_path / "imported")):
        code, _, err = run_cli(capsys, "train", "--out", tmp_path / run, "--init-from", init_from,
                               *train)
        assert code == 0, err

    def exported_ids(run):
        out = tmp_path / f"out-{run}"
        code, _, err = run_cli(capsys, "export-hf", tmp_path / run, out)
        assert code == 0, err
        auto = transformers.AutoTokenizer.from_pretrained(out)
        written = [json.loads((out / name).read_text())
                   for name in ("config.json", "generation_config.json")]
        return [{key: document[key] for key in expected} for document in written], \
            (auto.bos_token, auto.eos_token), err

    for run in ("imported", "tuned", "tuned_imported"):
        assert exported_ids(run) == ([expected, expected], ("<s>", "</s>"), ""), run
    (source / "tokenizer.json").unlink()   # the run no longer knows its source's ids
    default = {"bos_token_id": None, "eos_token_id": None}   # this tokenizer has no <|endoftext|>
    ids, tokens, err = exported_ids("tuned")
    assert ids == [default, default] and tokens == (None, None)
    assert err.startswith("note: ") and "the export names the default bos and eos" in err


def test_export_refuses_an_out_dir_it_cannot_make_before_loading_the_run(tmp_path, monkeypatch,
                                                                         capsys):
    from cli_helpers import assert_one_line_error, run_cli
    import xpmodel.train.runs as runs
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    tiny_hf_dir(tmp_path / "gpt")
    assert run_cli(capsys, "import-hf", tmp_path / "gpt", "--out", tmp_path / "run")[0] == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")

    def loaded(*args, **kwargs):
        raise AssertionError("the run was loaded before OUT_DIR was checked")
    monkeypatch.setattr(runs, "load", loaded)
    for target, problem in ((notes / "hf", f"{notes} is not a folder"),
                            (notes, "exists and is not a directory")):
        code, _, err = run_cli(capsys, "export-hf", tmp_path / "run", target)
        assert code == 2
        assert_one_line_error(err)
        assert err.startswith(f"error: OUT_DIR {target}: {problem}"), err
    assert notes.read_text() == "mine"
