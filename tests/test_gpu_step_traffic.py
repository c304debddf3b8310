"""A training step on a GPU is queued without the host waiting for the
device, and copies nothing from host memory but its batch: clipping,
float16 loss scaling, skipped steps, the schedule's learning rate, both
optimizers and the health records' norms are decided on the device or passed
to kernels as arguments.

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
    ["train.health_interval=2"],
    ["train.precision=fp16", "train.grad_clip=0"],
    ["train.precision=bf16", "train.grad_accum=2", "model.dropout=0.1"],
    ["train.optimizer=muon", "train.grad_clip=0", *LLAMA],
    ["train.optimizer=muon", "train.precision=fp16", "train.muon_nesterov=false"],
], ids=["adamw-health", "fp16-no-clip", "bf16-accum-dropout", "muon-llama", "muon-fp16"])
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


def test_evaluation_reads_the_device_once(tmp_path):
    """The validation loss and `xpmodel eval` queue every batch, copying only
    its tokens, and read their losses together at the end, the same values as
    batch by batch."""
    import numpy as np
    import xpmodel
    from xpmodel.tokenizer.bpe import BPETokenizer
    from xpmodel.train.evaluate import batch_losses, evaluate_tokens
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    config = xpmodel.GPTConfig(vocab_size=260, block_size=16, n_layer=1, n_head=2, n_embd=16)
    tokens = np.random.default_rng(0).integers(0, 256, 200)
    batches = [(tokens[i:i + 32].reshape(2, 16), tokens[i + 1:i + 33].reshape(2, 16))
               for i in (0, 40, 80)]
    with cuda_emulator.emulated_cuda():
        model = xpmodel.GPT(config, device="cuda")
        one_by_one = [float(model.loss(x, y)) for x, y in batches]
        with cuda_emulator.counting_transfers() as transfers:
            together = batch_losses(model, batches)
        assert len(transfers.to_host) == 1 and list(together) == one_by_one
        assert [shape for shape, _ in transfers.to_device] == [(2, 16)] * 6   # x and y of each
        with cuda_emulator.counting_transfers() as transfers:
            result = evaluate_tokens(model, BPETokenizer.train("abc", 256), tokens, batch_size=2)
        assert len(transfers.to_host) == 1 and result["tokens"] == 199
