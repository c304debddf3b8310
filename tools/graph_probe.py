"""Can a CUDA graph capture xpmodel's GPU work? CuPy refuses its own cuBLAS
calls inside a capture; xpmodel calls cuBLAS directly. On a GPU machine this
tries, in turn, a fused kernel, a cuBLAS product through xpmodel.cuda.gemm,
and a small model's fp16 forward + backward, each captured on a side stream
and replayed, and prints one line per attempt: what a graph-launched
training step would run into first.

    python tools/graph_probe.py
"""
import numpy as np


def attempt(name, work):
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        work()                      # compiles kernels and fills the memory pool
        stream.synchronize()
        try:
            stream.begin_capture()
            try:
                work()
            finally:
                graph = stream.end_capture()
            graph.launch()
            stream.synchronize()
            print(f"{name}: captured and replayed")
        except Exception as exc:
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def main():
    import cupy
    import xpmodel
    from xpmodel.layers.gelu import gelu_forward
    from xpmodel.layers.matmul import matmul
    a = cupy.ones((512, 512), np.float16)
    attempt("fused kernel (GELU)", lambda: gelu_forward(a.copy()))
    attempt("cuBLAS product (xpmodel.cuda.gemm)", lambda: matmul(a, a))
    config = xpmodel.GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=128)
    model = xpmodel.GPT(config, device="cuda", precision="fp16")
    idx = cupy.asarray(np.random.default_rng(0).integers(0, 256, (4, 64)))
    # The ids' range checks read the device, which a capture cannot: a captured
    # step would check its batch before. Here they are known to be in range.
    model.check_ids = lambda ids, what: ids
    model._check_targets = lambda targets, shape: targets
    attempt("model forward + backward (fp16)", lambda: model.forward_backward(idx, idx))


if __name__ == "__main__":
    main()
