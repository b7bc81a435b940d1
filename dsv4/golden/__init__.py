"""NumPy goldens: dsv4.golden.<kernel> mirrors dsv4.<kernel> argument for argument.

Written for reading: plain NumPy in pypto-lib's step order, every rounding
point a call into dsv4.golden.numerics.
"""
from . import numerics
from .._families import FAMILIES, NAMES, load
# torch tensors in, torch tensors out, as for the C kernels
from .._kernels import dlpack_io

for _family, _module in load(__name__).items():
    for _name in FAMILIES[_family]:
        globals()[_name] = dlpack_io(getattr(_module, _name))

__all__ = ["numerics", *NAMES]
