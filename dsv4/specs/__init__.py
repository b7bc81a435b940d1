"""Seeded input builders: dsv4.specs.<kernel>(..., seed=0, config=None) -> dict of inputs
keyed by pypto-lib's tensor names, ready for dsv4.<kernel>(**inputs).

Also, per kernel, pypto-lib's comparator for each output (COMPARATORS) and the
deployment cases `python -m dsv4 check` runs (CASES).
"""
from .._families import FAMILIES, NAMES, load

COMPARATORS, CASES = {}, {}
for _family, _module in load(__name__).items():
    for _name in FAMILIES[_family]:
        globals()[_name] = getattr(_module, _name)
    COMPARATORS.update(getattr(_module, "COMPARATORS", {}))
    CASES.update(getattr(_module, "CASES", {}))

__all__ = [*NAMES, "COMPARATORS", "CASES"]
