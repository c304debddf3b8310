"""Random numbers on a GPU from a counter: element i of a stream is a hash of
the stream's 64-bit key and i, so nothing is initialised or stored, and a
kernel can draw the value of any element it touches. The flash attention
kernels draw their dropout masks on the probabilities this way, in forward
and again in backward, never writing a T x T mask; the mask over a
C-contiguous (B, H, T, T) array of a stream's key is the same one.

CuPy's default generator (XORWOW) instead initialises a state for each
thread of its grid (2,048 per multiprocessor) whenever one is made, which a
training pass would do once per micro-batch.

Each draw of a CounterGenerator (a mask, uniform values, a key for a
kernel) is a new stream, its key made on the host by SplitMix64 from the
generator's seed and the draw's number: the same seed gives the same masks,
in a resumed run or a recomputed block.
"""
import numpy

from ..backend import import_cupy
from .compile import c_type, raw_kernel, stride_grid

# 32 random bits of element `index` of the stream (key0, key1): two rounds of
# a 32-bit integer finaliser (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
# x *= 0x846ca68b; x ^= x >> 16, every output bit depending on every input
# bit), the first over the index's low word and key0, the second adding its
# high word and key1. (Past 2^32 elements a stream repeats its first 2^32
# bits in another order: harmless for masks.)
RANDOM_BITS = r"""
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
__device__ __forceinline__ unsigned random_bits(unsigned key0, unsigned key1, unsigned long long index) {
    return mix32(mix32((unsigned)index ^ key0) + ((unsigned)(index >> 32) ^ key1));
}
"""

_KEEP_SOURCE = RANDOM_BITS + r"""
// keep[i] = 1 where element i is kept (its bits >= threshold), else 0
extern "C" __global__ void keep_mask(unsigned char* keep, long long n, unsigned key0,
        unsigned key1, unsigned threshold) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        keep[i] = random_bits(key0, key1, i) >= threshold;
}
"""

_UNIFORM_SOURCE = RANDOM_BITS + r"""
// out[i] uniform in [0, 1): the top 24 bits of element i, over 2^24
extern "C" __global__ void uniform(X_T* out, long long n, unsigned key0, unsigned key1) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        store(out + i, (float)(random_bits(key0, key1, i) >> 8) * (1.0f / 16777216.0f));
}
"""
_MASK64 = (1 << 64) - 1


def dropout_threshold(rate):
    """(threshold, scale): an element is kept when its 32 bits are at least
    threshold (rate * 2^32, rounded down), and then scaled by 1 / (1 - rate)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout rate must be in (0, 1), got {rate}")
    return numpy.uint32(int(rate * 2.0 ** 32)), numpy.float32(1.0 / (1.0 - rate))


class CounterGenerator:
    """The generator of one training pass on a GPU: dropout masks (keep_mask),
    stream keys for kernels that draw their own (next_key), and the embedding
    noise's draws through cupy.random.Generator's methods `random` and
    `standard_normal` (other values than CuPy's). seed: an int or a sequence
    of ints (mixed into one 64-bit seed)."""

    def __init__(self, seed):
        words = numpy.random.SeedSequence(seed).generate_state(2, numpy.uint32)
        self.seed = int(words[0]) | int(words[1]) << 32
        self.draws = 0

    def next_key(self):
        """(key0, key1), uint32: a new stream's key, SplitMix64 of the seed and the draw's number."""
        self.draws += 1
        z = (self.seed + self.draws * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        return numpy.uint32(z & 0xFFFFFFFF), numpy.uint32(z >> 32)

    def keep_mask(self, shape, rate):
        """A new stream's keep mask for dropout rate `rate`: bool, True where an
        element is kept."""
        threshold, _ = dropout_threshold(rate)
        return self._launch(_KEEP_SOURCE, "keep_mask", shape, numpy.bool_, threshold)

    def random(self, shape, dtype=numpy.float32):
        """A new stream's values, uniform in [0, 1), in dtype (float32 or float64)."""
        return self._launch(_UNIFORM_SOURCE, "uniform", shape, dtype, X_T=c_type(dtype))

    def standard_normal(self, shape, dtype=numpy.float32):
        """Normal values from two uniform streams (Box-Muller)."""
        cupy = import_cupy()
        radius = cupy.sqrt(-2.0 * cupy.log1p(-self.random(shape, dtype)))
        return radius * cupy.cos((2.0 * numpy.pi) * self.random(shape, dtype))

    def _launch(self, source, name, shape, dtype, *extra, **macros):
        """A new stream's values of `name(out, n, key0, key1, *extra)` in a new
        array of shape and dtype."""
        out = import_cupy().empty(shape, dtype=dtype)
        n = out.size
        kernel = raw_kernel(source, name, **macros)
        kernel(*stride_grid(n), (out, numpy.int64(n), *self.next_key(), *extra))
        return out
