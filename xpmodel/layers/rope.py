"""Rotary position embedding on query and key heads.

Each head's D values are D/2 pairs (x[j], x[j + D/2]), the layout Hugging
Face's Llama uses ("rotate half"); pair j at position t turns by the angle
t * theta^(-2j/D). A rotation's gradient is the opposite rotation, and a
query-key product of two rotated vectors depends only on their distance.
"""
import numpy

from ..backend import array_module, to_device

_tables = {}   # (D, theta, device, dtype) -> (cos, sin) of the most positions asked for yet


def rope_tables(positions, D, theta, device, dtype):
    """(cos, sin), each (positions, D/2) on device in dtype (>= float32),
    computed in float64 on the host: the first rows of tables kept per (D,
    theta, device, dtype), which double in length when more positions are
    asked for (so a long block_size costs only the positions a pass uses)."""
    key = (D, float(theta), str(device), numpy.dtype(dtype).str)
    tables = _tables.get(key)
    if tables is None or len(tables[0]) < positions:
        rows = 1 << max(0, positions - 1).bit_length()
        inv_freq = float(theta) ** (-numpy.arange(0, D, 2, dtype=numpy.float64) / D)   # (D/2,)
        angles = numpy.outer(numpy.arange(rows, dtype=numpy.float64), inv_freq)
        tables = tuple(to_device(table.astype(dtype), device)
                       for table in (numpy.cos(angles), numpy.sin(angles)))
        if len(_tables.get(key, tables)[0]) <= rows:   # another thread's may be longer
            _tables[key] = tables
    cos, sin = tables
    return cos[:positions], sin[:positions]


def rope_forward(x, cos, sin):
    """x: (..., T, D), cos, sin: (T, D/2) -> rotated x (new array, x's dtype):
    [x1 cos - x2 sin, x2 cos + x1 sin] for the halves x1, x2."""
    return _rotate(x, cos, sin, -sin)


def rope_backward(dout, cos, sin):
    """dout: (..., T, D) -> dx: dout turned back by the same angles,
    [d1 cos + d2 sin, d2 cos - d1 sin]."""
    return _rotate(dout, cos, -sin, sin)


def _rotate(x, cos, sin_up, sin_low):
    """[x1 cos + x2 sin_low, x2 cos + x1 sin_up], each half computed in the
    tables' dtype (>= float32) and rounded once into x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = array_module(x).empty_like(x)
    low = x1 * cos
    low += x2 * sin_low
    out[..., :half] = low
    high = x2 * cos
    high += x1 * sin_up
    out[..., half:] = high
    return out
