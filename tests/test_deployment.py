"""Every kernel against its golden on pypto-lib's deployment cases (FLASH shapes,
dsv4.specs.CASES): the cases of `python -m dsv4 check`, with its comparators."""
import pytest

import dsv4

KERNELS = sorted(dsv4.KERNELS)

# the layers' deployment cases (FLASH, 2 ranks, a minute of NumPy golden each) run in the
# main job, `python -m dsv4 check`; here the layers run C against golden on small models
# (tests/test_kernels.py: test_small_config, the path and thread checks; tests/test_layers.py)
# lm_head's deployment cases hold the FLASH vocabulary (1 GB of bf16 weights) and prefill_mtp's
# a layer's weights: `python -m dsv4 check` runs them; tests/test_mtp.py runs lm_head at T = 8
# and 128 on a smaller vocabulary and prefill_mtp on a small model
DEPLOYMENT = [(k, case) for k in KERNELS for case in dsv4.specs.CASES[k]
              if "layer" not in k and k not in ("lm_head", "prefill_mtp")]


@pytest.mark.parametrize("kernel,case", DEPLOYMENT, ids=[f"{k}-{c}" for k, c in DEPLOYMENT])
def test_deployment_case(kernel, case):
    # seed 7, as in tests/test_kernels.py: the FLASH weights are drawn once for both files
    results = dsv4.check(kernel, case, seed=7, repeat=1)
    assert all(results), "\n".join(map(str, results))
