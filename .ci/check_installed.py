"""xpmodel as a user installed it: run by .ci/run with the Python of a virtual
environment that has the wheel (not the source tree) installed.

usage: python check_installed.py SOURCE_TREE

1. `import xpmodel` finds the installed package, not SOURCE_TREE.
2. Every module of SOURCE_TREE's package (and of configs/, installed as
   xpmodel.configs) imports from the installed package, and every shipped
   config is there.
3. One training step takes the CUDA path on the kernel emulator of the tests
   (SOURCE_TREE/tests/cuda_emulator: CuPy faked on NumPy, each kernel compiled
   by g++ from the source string the installed package holds) and matches the
   same step on the CPU.
"""
import importlib
import importlib.resources
import sys
from pathlib import Path

import numpy

source = Path(sys.argv[1]).resolve()
import xpmodel  # noqa: E402

installed = Path(xpmodel.__file__).resolve().parent


def is_below(path, folder):
    return Path(path).resolve().is_relative_to(folder)


assert not is_below(installed, source), f"xpmodel imported from the source tree: {installed}"
print(f"xpmodel {xpmodel.__version__} from {installed}")

# 2. Every module and config of the tree, from the installed package.
modules = []
for folder, package in ((source / "xpmodel", "xpmodel"), (source / "configs", "xpmodel.configs")):
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        modules.append(".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts)))
for name in modules:
    module = importlib.import_module(name)
    assert is_below(module.__file__, installed), f"{name} imported from {module.__file__}"
print(f"imported {len(modules)} modules")

from xpmodel.config import shipped_configs  # noqa: E402

configs_dir = importlib.resources.files("xpmodel.configs")
assert is_below(str(configs_dir), installed), f"shipped configs read from {configs_dir}"
assert shipped_configs() == sorted(p.stem for p in (source / "configs").glob("*.yaml")), shipped_configs()
print(f"shipped configs: {', '.join(shipped_configs())}")

# 3. The CUDA path of one training step, on the emulator.
sys.path.append(str(source / "tests"))
import cuda_emulator  # noqa: E402
from xpmodel.cuda import compile as kernels  # noqa: E402

assert cuda_emulator.compiler() is not None, "the CUDA emulator needs g++"
config = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
idx = numpy.random.default_rng(0).integers(0, config.vocab_size, (2, config.block_size))
targets = numpy.roll(idx, -1, axis=1)


def one_step(device):
    """(loss, parameters after one AdamW step) on `device`."""
    model = xpmodel.GPT(config, device=device, seed=0)
    optimizer = xpmodel.AdamW(model, lr=1e-2)
    model.zero_grad()
    loss = float(model.forward_backward(idx, targets))
    optimizer.step()
    return loss, numpy.asarray(xpmodel.backend.to_host(model.flat_params), dtype=numpy.float64)


cpu_loss, cpu_params = one_step("cpu")
with cuda_emulator.emulated_cuda():
    cuda_loss, cuda_params = one_step("cuda")
    launched = sorted({name for _, name, _ in kernels._compiled})   # keys: (source, name, macros)
assert launched, "no CUDA kernel was compiled: the step did not take the CUDA path"
assert abs(cuda_loss - cpu_loss) < 1e-4 * cpu_loss, (cuda_loss, cpu_loss)
assert numpy.max(numpy.abs(cuda_params - cpu_params)) < 1e-4, "parameters after the step differ"
print(f"one training step on the emulated GPU ({len(launched)} kernels: {', '.join(launched)}): "
      f"loss {cuda_loss:.6f}, CPU {cpu_loss:.6f}")
