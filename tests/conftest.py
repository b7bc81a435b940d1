import numpy as np
import pytest

import dsv4


@pytest.fixture
def threads():
    """Set the kernel thread count for one test; restored afterwards."""
    before = dsv4.get_num_threads()
    yield dsv4.set_num_threads
    dsv4.set_num_threads(before)


@pytest.fixture
def isa():
    """Switch the SIMD path for one test; restored afterwards."""
    before = dsv4.get_isa()
    yield dsv4.set_isa
    dsv4.set_isa(before)


def same_bits(a, b):
    """Arrays equal bit for bit (NaN payloads included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
