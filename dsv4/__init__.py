"""dsv4: the DeepSeek-V4 kernels of pypto-lib on the CPU.

Every kernel exists twice, under one name:

    dsv4.<kernel>(**inputs)          fast C kernel (multi-threaded, GIL released)
    dsv4.golden.<kernel>(**inputs)   NumPy golden reproducing pypto-lib's torch golden
    dsv4.specs.<kernel>(seed=0)      seeded inputs, keyed by pypto-lib's tensor names

Both return a dict of outputs keyed by pypto-lib's output names. To compare
an output of your own: dsv4.verify(kernel, outputs, inputs).
"""
from . import _threads

with _threads.passive_wait():
    from ._C import available_isas, get_isa, get_num_threads, set_isa, set_num_threads
from . import bisect, case, compare, config, golden, specs
from . import _kernels
from ._kernels import CORE, KERNELS
from .case import load_case, save_outputs
from .check import check, verify
from .config import DEMO, FLASH, PRO, DeepSeekV4Config, get_config
from .layers import prefill_metadata, prefill_tiles
from .forward import decode_fwd, prefill_fwd
from .rope import gather_rope_rows, rope_tables

globals().update(KERNELS)
decode_fwd, prefill_fwd = (_kernels.dlpack_io(f) for f in (decode_fwd, prefill_fwd))


def _isa_from_environment():
    import os
    name = os.environ.get("DSV4_ISA")
    if name:
        try:
            set_isa(name)
        except ValueError as err:
            raise ValueError(f"environment variable DSV4_ISA={name!r}: {err}") from None


_isa_from_environment()
_threads.threads_from_environment(set_num_threads)

__version__ = "0.1.0"
__all__ = [*KERNELS, "KERNELS", "golden", "specs", "compare", "config", "check", "verify",
           "DeepSeekV4Config", "DEMO", "FLASH", "PRO", "get_config", "rope_tables",
           "gather_rope_rows", "set_num_threads", "get_num_threads", "set_isa", "get_isa",
           "available_isas"]
__all__ += ["prefill_metadata", "prefill_tiles", "case", "load_case", "save_outputs", "bisect",
            "decode_fwd", "prefill_fwd"]
