"""The rotary head split and merge in 16-byte vectors (xpmodel/cuda/rope_heads.py)
against its element kernels, bit for bit, in float16 and bfloat16: with and
without bias and rotation, for H_kv = H, groups of 2 and 4 and H_kv = 1, D of
16 to 128, over rows that take more than one round of the grid's rows. Runs on
the CPU emulator of tests/cuda_emulator (and on a GPU when there is one)."""
import numpy as np
import pytest

from xpmodel.backend import BFLOAT16, to_host

SPLIT, MERGE = ("split_rope_heads_h16x8", "split_rope_heads"), ("merge_rope_heads_h16x8",
                                                               "merge_rope_heads")
# 74 rows: past the emulator's 64 row blocks of the split and 32 of the merge
B, T = 2, 37


def inputs(rng, dtype, H, H_kv, D, with_bias, rotary, rows=(B, T)):
    """Host qkv (B, T, (H + 2 H_kv) D), its bias or None, and float32 rope
    tables (T, D/2) or None."""
    width = (H + 2 * H_kv) * D
    qkv = (rng.standard_normal((*rows, width)) * 2).astype(np.float32).astype(dtype)
    bias = rng.standard_normal(width).astype(np.float32).astype(dtype) if with_bias else None
    angles = np.outer(np.arange(rows[1]), 100.0 ** (-np.arange(0, D, 2) / D))
    rope = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)) if rotary else None
    return qkv, bias, rope


def placed(cp, host, off=False):
    """`host` on the device, 16-byte aligned, or one element past that (off)."""
    if host is None:
        return None
    shift = 1 if off else 0
    device = cp.zeros(host.size + shift, dtype=host.dtype)[shift:].reshape(host.shape)
    device[...] = cp.asarray(host)
    return device


def recording_builds(monkeypatch):
    """The names of the kernels rope_heads builds from now on, in order."""
    from xpmodel.cuda import rope_heads
    built, make = [], rope_heads.raw_kernel
    monkeypatch.setattr(rope_heads, "raw_kernel", lambda *a, **k: built.append(a[1]) or make(*a, **k))
    return built


def split_and_merge(cp, qkv, bias, rope, H, H_kv, dbias):
    """The split of host qkv and the merge of those heads (as their own gradients)
    with device dbias: host bytes of q, k, v and the merge's output."""
    from xpmodel.cuda.rope_heads import merge_rope_heads, split_rope_heads
    g_rope = None if rope is None else tuple(cp.asarray(table) for table in rope)
    heads = split_rope_heads(placed(cp, qkv), placed(cp, bias), H, H_kv, g_rope, 0.125)
    out = merge_rope_heads(heads, g_rope, dbias)
    return [to_host(a).tobytes() for a in (*heads, out)], to_host(out)


def assert_vectors_equal_elements(cp, qkv, bias, rope, H, H_kv, monkeypatch):
    """The split and merge by the vector kernels, then by the element kernels (the
    choice turned off): q, k, v and the merged gradient equal bit for bit; the
    bias gradients, added to the same random start, are the same column sums, each
    summed in float32 over its own partition of the rows (the grids differ)."""
    from xpmodel.cuda import rope_heads
    start = np.random.default_rng(1).standard_normal(qkv.shape[-1]).astype(np.float32)
    built = recording_builds(monkeypatch)
    dbias_vector, dbias_element = cp.asarray(start), cp.asarray(start)
    vector, out = split_and_merge(cp, qkv, bias, rope, H, H_kv, dbias_vector)
    monkeypatch.setattr(rope_heads, "_in_pairs_of_vectors", lambda *args: False)
    element, _ = split_and_merge(cp, qkv, bias, rope, H, H_kv, dbias_element)
    assert built == [SPLIT[0], MERGE[0], SPLIT[1], MERGE[1]]
    assert vector == element
    dbias_vector, dbias_element = (to_host(d).astype(np.float64) for d in (dbias_vector, dbias_element))
    scale = np.abs(out.astype(np.float64)).sum(axis=0) + 1.0
    assert np.all(np.abs(dbias_vector - dbias_element) <= 1e-5 * scale)
    assert np.all(np.abs(dbias_vector - start) > 0)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("with_bias,rotary", [(True, True), (False, True), (True, False),
                                              (False, False)])
def test_vector_split_and_merge_equal_the_element_kernels(cp, dtype, D, H, H_kv, with_bias, rotary,
                                                          monkeypatch):
    """Aligned 16-bit heads with D a multiple of 16 take the vector kernels, and
    give what the element kernels give."""
    qkv, bias, rope = inputs(np.random.default_rng(D + H + H_kv), dtype, H, H_kv, D, with_bias,
                             rotary)
    assert_vectors_equal_elements(cp, qkv, bias, rope, H, H_kv, monkeypatch)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
def test_vector_kernels_over_two_column_blocks(cp, dtype, monkeypatch):
    """32 query and 8 key/value heads of 128: 384 pairs of vectors a row, two
    blocks of 256 threads along the grid's x."""
    qkv, bias, rope = inputs(np.random.default_rng(7), dtype, 32, 8, 128, True, True, rows=(1, 70))
    assert_vectors_equal_elements(cp, qkv, bias, rope, 32, 8, monkeypatch)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("H_kv", [4, 2])
@pytest.mark.parametrize("misaligned", ["qkv", "bias"])
def test_split_off_alignment_takes_the_element_kernel(cp, dtype, H_kv, misaligned, monkeypatch):
    """qkv or the bias one element past 16-byte alignment: the element kernel,
    with the same heads as the vector kernel's from aligned copies."""
    from xpmodel.cuda.rope_heads import split_rope_heads
    H, D = 4, 32
    qkv, bias, rope = inputs(np.random.default_rng(3), dtype, H, H_kv, D, True, True)
    g_rope = tuple(cp.asarray(table) for table in rope)
    built = recording_builds(monkeypatch)
    runs = [split_rope_heads(placed(cp, qkv, off and misaligned == "qkv"),
                             placed(cp, bias, off and misaligned == "bias"), H, H_kv, g_rope, 0.125)
            for off in (False, True)]
    aligned, shifted = ([to_host(part).tobytes() for part in heads] for heads in runs)
    assert built == list(SPLIT) and aligned == shifted


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16])
@pytest.mark.parametrize("H_kv", [4, 2])
@pytest.mark.parametrize("misaligned", [0, 1, 2])
def test_merge_off_alignment_takes_the_element_kernel(cp, dtype, H_kv, misaligned, monkeypatch):
    """dq, dk or dv one element past 16-byte alignment: the element kernel, with
    the same output as the vector kernel's from aligned copies."""
    from xpmodel.cuda.rope_heads import merge_rope_heads
    H, D = 4, 32
    rng = np.random.default_rng(4)
    shapes = [(B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)]
    dheads = [rng.standard_normal(shape).astype(np.float32).astype(dtype) for shape in shapes]
    _, _, rope = inputs(rng, dtype, H, H_kv, D, False, True)
    g_rope = tuple(cp.asarray(table) for table in rope)
    built = recording_builds(monkeypatch)
    runs = [to_host(merge_rope_heads([placed(cp, part, off and i == misaligned)
                                      for i, part in enumerate(dheads)], g_rope)).tobytes()
            for off in (False, True)]
    assert built == list(MERGE) and runs[0] == runs[1]


@pytest.mark.parametrize("dtype,D", [(np.float16, 8), (np.float16, 24), (np.float32, 32)])
def test_other_heads_take_the_element_kernels(cp, dtype, D, monkeypatch):
    """D not a multiple of 16 (a head's half not whole vectors) or float32 heads:
    the element kernels."""
    qkv, bias, rope = inputs(np.random.default_rng(5), dtype, 4, 2, D, True, True)
    built = recording_builds(monkeypatch)
    split_and_merge(cp, qkv, bias, rope, 4, 2, cp.zeros(qkv.shape[-1], np.float32))
    assert built == [SPLIT[1], MERGE[1]]


@pytest.mark.parametrize("rows", [(0, 5), (3, 0)])
@pytest.mark.parametrize("H_kv", [4, 2])
def test_no_rows_split_and_merge_to_empty_arrays(cp, rows, H_kv, monkeypatch):
    """B * T = 0: empty heads and an empty merge, by the vector kernels; dbias
    stays as it was."""
    H, D = 4, 32
    qkv, bias, rope = inputs(np.random.default_rng(6), np.float16, H, H_kv, D, True, True, rows)
    built = recording_builds(monkeypatch)
    start = np.arange(qkv.shape[-1], dtype=np.float32)
    dbias = cp.asarray(start)
    _, out = split_and_merge(cp, qkv, bias, rope, H, H_kv, dbias)
    assert built == [SPLIT[0], MERGE[0]]
    assert out.shape == (0, qkv.shape[-1]) and np.array_equal(to_host(dbias), start)


def test_rotations_round_alike_in_every_build():
    """NVRTC contracts a product and a sum into one fused multiply-add where it
    chooses, so the vector and element kernels could round one rotation
    differently on a GPU (the emulator never fuses). The rotation is one
    explicit fused multiply-add in both: no kernel's PTX adds or subtracts a
    separately rounded product. float16 and bfloat16, with and without rope."""
    import cuda_emulator
    from cuda_emulator import nvrtc
    if cuda_emulator.compiler() is None or nvrtc.library() is None:
        pytest.skip("needs g++ and the nvidia-cuda-nvrtc wheel")
    start = len(cuda_emulator.built)
    with cuda_emulator.emulated_cuda() as cp:
        for dtype in (np.float16, BFLOAT16):
            for rotary in (True, False):
                qkv, bias, rope = inputs(np.random.default_rng(0), dtype, 4, 2, 32, True, rotary,
                                         rows=(1, 2))
                split_and_merge(cp, qkv, bias, rope, 4, 2, cp.zeros(qkv.shape[-1], np.float32))
    codes = {code for name, code in cuda_emulator.built[start:] if "rope_heads" in name}
    assert len(codes) == 2                     # float16 and bfloat16; without rope, R_T is float
    for code in codes:
        assert not any(nvrtc.unfused_sums(code).values()), nvrtc.unfused_sums(code)
