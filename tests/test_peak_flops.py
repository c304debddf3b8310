"""The peak MFU is measured against: the table of dense 16-bit tensor-core
peaks by GPU name, train.peak_flops for anything else, and what a run says
about which one it used."""
from types import SimpleNamespace

import pytest

from xpmodel.train.peak_flops import GPU_PEAKS, mfu_peak, table_peak


@pytest.mark.parametrize("device_name,entry", [
    ("NVIDIA H100 80GB HBM3", ("H100", 989e12)), ("NVIDIA H100 PCIe", ("H100 PCIe", 756e12)),
    ("NVIDIA H100 NVL", ("H100 NVL", 835e12)), ("NVIDIA H200", ("H200", 989e12)),
    ("NVIDIA GH200 480GB", ("GH200", 989e12)), ("NVIDIA A100-SXM4-80GB", ("A100", 312e12)),
    ("NVIDIA A100 80GB PCIe", ("A100", 312e12)), ("NVIDIA A10", ("A10", 125e12)),
    ("NVIDIA L4", ("L4", 121e12)), ("NVIDIA L40S", ("L40S", 362e12)), ("NVIDIA L40", ("L40", 181e12)),
    ("NVIDIA GeForce RTX 4090", ("RTX 4090", 165.2e12)), ("NVIDIA GeForce RTX 3090", ("RTX 3090", 71e12)),
    ("Tesla V100-PCIE-32GB", ("V100-PCIE", 112e12)), ("Tesla T4", ("T4", 65e12)),
    ("NVIDIA H800", ("H800", 989e12)), ("NVIDIA A800-SXM4-80GB", ("A800", 312e12)),
    ("NVIDIA A40", ("A40", 149.7e12)), ("NVIDIA RTX A6000", ("RTX A6000", 154.8e12)),
    ("NVIDIA B200", ("B200", 2250e12)),
    # whole names only: no A100 figure for an A10G, no RTX 3090 figure for a 3090 Ti,
    # and variants with other clocks or core counts have no figure
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("NVIDIA RTX 6000 Ada Generation", None),
    ("CPU emulator", None), ("", None)])
def test_device_names_find_their_entry(device_name, entry):
    assert table_peak(device_name) == entry


def test_every_entry_is_dense_and_plausible():
    assert all(flops is None or 50e12 <= flops <= 2500e12 for _, flops in GPU_PEAKS)


def test_mfu_peak_says_which_peak_it_uses():
    flops, source = mfu_peak("NVIDIA H200", "bf16")
    assert flops == 989e12 and "H200" in source and "bf16" in source and "989 TFLOP/s" in source
    assert mfu_peak("NVIDIA H200", "fp16")[0] == 989e12
    flops, source = mfu_peak("NVIDIA H200", "fp32")
    assert flops is None and "train.peak_flops" in source and "train.precision=bf16" in source
    flops, source = mfu_peak("NVIDIA B300", "bf16")
    assert flops is None and "NVIDIA B300" in source and "train.peak_flops" in source
    assert mfu_peak("NVIDIA B300", "fp32", 2.5e15) == (2.5e15, "train.peak_flops, 2500 TFLOP/s")
    assert mfu_peak("Tesla T4", "fp16")[0] == 65e12
    flops, source = mfu_peak("Tesla T4", "bf16")
    assert flops is None and "no bf16 tensor cores" in source


def test_a_run_on_a_gpu_uses_train_peak_flops(tmp_path, monkeypatch):
    """On the CPU emulator's GPU (not in the table) MFU appears once
    train.peak_flops is set, and the summary names the peak. MFU is each GPU's:
    with K ranks the tokens/s of all of them is shared among K peaks."""
    import cuda_emulator
    from cli_helpers import write_corpus
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    from test_bf16 import TINY
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    with cuda_emulator.emulated_cuda():
        for peak in (None, 1e12):
            config = load_config(TINY, [f"data.source={corpus}", "train.max_iters=1",
                                        f"train.peak_flops={peak or 'null'}"])
            trainer = Trainer.start(config, device="cuda", out=tmp_path / f"run-{peak}", show=False)
            flops, source = trainer.mfu_peak()
            assert flops == peak and "train.peak_flops" in source
            mfu = trainer.gpt_config.flops_per_token() * 1000.0 / peak if peak else None
            assert trainer._mfu(1000.0) == pytest.approx(mfu)
            if peak:
                trainer.dist = SimpleNamespace(world_size=4)
                assert trainer._mfu(1000.0) == pytest.approx(mfu / 4)
                trainer.dist = None
            summary = trainer.run()
            assert summary["mfu_peak"] == source
    cpu = Trainer.start(config, device="cpu", out=tmp_path / "cpu", show=False)
    assert cpu.mfu_peak() == (None, None) and cpu._mfu(1000.0) is None
