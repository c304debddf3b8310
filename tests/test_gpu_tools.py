"""The tools a GPU session runs (tools/gpu_check.sh) run through on the CUDA
emulator at small sizes, so a renamed function or an API the emulator
refuses shows up here, not in the few minutes a GPU is lent. Their figures
mean nothing on the emulator; only that they run, and what they compare
agrees."""
import sys
from pathlib import Path

import pytest

import cuda_emulator

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture
def tools(monkeypatch):
    """The tools importable, with `import cupy` giving the emulator."""
    with cuda_emulator.emulated_cuda_or_skip() as cp:
        monkeypatch.syspath_prepend(str(TOOLS))
        monkeypatch.setitem(sys.modules, "cupy", cp)
        yield


def run(monkeypatch, module, *argv):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


@pytest.mark.parametrize("config,precision", [("tiny", "fp16"), ("llama-tiny", "bf16")])
def test_gpu_sections_runs_every_part(tools, monkeypatch, capsys, config, precision):
    import gpu_sections
    monkeypatch.setattr(gpu_sections, "timed", lambda fn, repeat=10: (fn(), 1.0)[1])
    run(monkeypatch, gpu_sections, "--config", config, "--precision", precision)
    out = capsys.readouterr().out
    assert "step" in out and "attention" in out


@pytest.mark.parametrize("dropout", ["0", "0.2"])
def test_attention_probe_compares_flash_with_the_t_by_t_path(tools, monkeypatch, capsys, dropout):
    """At heads of 64 the flash kernels run and agree with the float32 reference,
    with dropout too (every path drawing the same counter-based mask)."""
    import attention_probe
    import bench_gpu
    import gpu_sections
    monkeypatch.setitem(bench_gpu.CONFIGS, "probe", (1, 2, 128, 128, 1, 256, {}))
    monkeypatch.setattr(gpu_sections, "timed", lambda fn, repeat=10: (fn(), 1.0)[1])
    run(monkeypatch, attention_probe, "--configs", "probe", "--dtypes", "float16",
        "--dropout", dropout)
    lines = [line for line in capsys.readouterr().out.splitlines() if "against float32" in line]
    assert [line.split()[0] for line in lines] == ["T", "flash"]
    for line in lines:
        output, gradient = (float(word.rstrip(",")) for word in line.split()
                            if word[0].isdigit() and "e-" in word)
        assert output < 2e-3 and gradient < 2e-3, line


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_bench_gpu_steps_xpmodel_as_the_trainer_does(tools, precision):
    """The benchmark's xpmodel step on the GPU (zero-grad, forward and
    backward, clipping and AdamW, a loss scale in fp16) trains."""
    import bench_gpu
    import xpmodel
    from xpmodel.backend import to_host
    L, H, C, T, B, V, options = bench_gpu.CONFIGS["tiny"]
    config = xpmodel.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **options)
    step, model = bench_gpu.xpmodel_step(config, B, "cuda", precision)
    before = to_host(model.flat_params).copy()
    step()
    step()
    assert (to_host(model.flat_params) != before).any()


@pytest.mark.parametrize("recipe", ["gpt2-adamw", "speedrun"])
def test_speedrun_engine_steps_on_the_gpu(tools, tmp_path, recipe):
    """speedrun.py's xpmodel engine on the GPU as `--size gpu` runs it (fp16,
    Muon's fused step and its device-side skip count in the speedrun recipe),
    shrunk: steps train, a loss estimate reads the device, and a sync finds
    no skipped update."""
    import numpy as np
    import speedrun
    from cli_helpers import write_corpus
    from xpmodel.data.corpus import build_tokenizer
    config = speedrun.load_recipe(recipe, "gpu", str(write_corpus(tmp_path / "corpus.txt")),
                                  ["model.n_layer=1", "model.block_size=64", "train.batch_size=2"])
    assert config.train.precision == "fp16"
    engine = speedrun.XpmodelEngine(config, build_tokenizer(config.data, say=lambda text: None),
                                    "cuda")
    x = np.arange(2 * 64).reshape(2, 64) % 60
    before = engine.loss([(x, x)])
    for _ in range(3):
        engine.step(3e-3, [(x, x)])
    engine.synchronize()
    assert engine.loss([(x, x)]) < before
