"""The counter-based dropout masks of xpmodel/cuda/random.py, made in NumPy:
what the float64 references of the GPU's dropout run with."""
import numpy as np

from xpmodel.cuda.random import CounterGenerator, dropout_threshold


def reference_random_bits(key, index):
    """cuda/random.py's random_bits(key0, key1, index) in NumPy: uint32
    arithmetic wraps as the GPU's does."""
    def mix32(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))
    low, high = (index & 0xFFFFFFFF).astype(np.uint32), (index >> np.uint64(32)).astype(np.uint32)
    return mix32(mix32(low ^ np.uint32(key[0])) + (high ^ np.uint32(key[1])))


class ReferenceMasks:
    """The keys and masks a CounterGenerator of `seed` gives, made in NumPy:
    the generator the float64 references run with."""

    def __init__(self, seed):
        self.keys = CounterGenerator(seed)   # its key schedule runs on the host

    def next_key(self):
        return self.keys.next_key()

    def keep_mask(self, shape, rate):
        threshold, _ = dropout_threshold(rate)
        index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
        return reference_random_bits(self.next_key(), index) >= threshold
