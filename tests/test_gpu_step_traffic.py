"""A training step on a GPU is queued without the host waiting for the
device, and copies nothing from host memory but its batch: clipping,
float16 loss scaling, skipped steps, the schedule's learning rate and both
optimizers are decided on the device or passed to kernels as arguments.

Checked on the CPU emulator of tests/cuda_emulator, which records every copy
between host and device (a real GPU hides them)."""
from pathlib import Path

import pytest

import cuda_emulator
from cli_helpers import run_cli, write_corpus

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
LLAMA = ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.bias=false",
         "model.qk_norm=true", "model.n_kv_head=1"]


@pytest.mark.parametrize("overrides", [
    [],
    ["train.precision=fp16", "train.grad_clip=0"],
    ["train.precision=bf16", "train.grad_accum=2", "model.dropout=0.1"],
    ["train.optimizer=muon", "train.grad_clip=0", *LLAMA],
    ["train.optimizer=muon", "train.precision=fp16", "train.muon_nesterov=false"],
], ids=["adamw", "fp16-no-clip", "bf16-accum-dropout", "muon-llama", "muon-fp16"])
def test_a_gpu_step_reads_nothing_and_copies_only_its_batch(overrides, tmp_path, capsys,
                                                           monkeypatch):
    from xpmodel.train.loop import Trainer
    steps = []
    train_step = Trainer._train_step

    def counted(trainer):
        with cuda_emulator.counting_transfers() as transfers:
            result = train_step(trainer)
        steps.append(transfers)
        return result

    monkeypatch.setattr(Trainer, "_train_step", counted)
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    with cuda_emulator.emulated_cuda():
        code, _, err = run_cli(capsys, "train", "--config", TINY, "--device", "cuda", "--out",
                               tmp_path / "run", "--quiet", f"data.source={corpus}",
                               "train.max_iters=4", *overrides)
    assert code == 0, err
    accum = 2 if "train.grad_accum=2" in overrides else 1
    assert len(steps) == 4
    for transfers in steps[1:]:   # the first also places tables kept for the run (RoPE's)
        assert transfers.to_host == []
        assert [shape for shape, _ in transfers.to_device] == [(4, 16)] * (2 * accum), \
            transfers.to_device   # x and y of each micro-batch
