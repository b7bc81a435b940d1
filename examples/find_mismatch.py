"""Find a mismatch that pypto-lib's comparators let pass: one wrong head in sparse attention.

Run it as a script (python examples/find_mismatch.py) or cell by cell in Jupyter or
VS Code (the `# %%` markers), where the reports show as HTML tables.
"""
# %% Inputs: one decode step of CSA sparse attention, 8 tokens, 64 heads (FLASH)
import os
import tempfile

import numpy as np

import dsv4

inputs = dsv4.specs.decode_sparse_attn(seed=0)
print({k: v.shape for k, v in inputs.items() if hasattr(v, "shape")})

# %% A fake NPU output: head 5 of tokens 2 and 5 reads its q three times too large
# (a wrong dequantisation scale on one tile, say). Everything else is right.
HEAD, TOKENS = 5, (2, 5)
q = inputs["q"].astype(np.float32)
q[list(TOKENS), HEAD] *= 3
npu = dsv4.golden.decode_sparse_attn(**dict(inputs, q=q.astype(inputs["q"].dtype)), stages=True)

# The NPU dumps its output and its per-head attention output Ob [T, H, HD], the
# golden's stage of the same name
actual = {"attn_out": npu["attn_out"], "Ob": npu["stages"]["Ob"]}

# %% Verify: pypto-lib's comparator passes both tensors...
report = dsv4.verify("decode_sparse_attn", actual, inputs)
assert report, report
print(report)            # ... but warns that Ob's bad elements all sit in one head
report                   # in Jupyter: the HTML table

# %% Per-axis bad counts name the head and the tokens
ob = report["Ob"]
print(ob.axes)                                                     # ('T', 'H', 'HD')
print("heads with bad elements:", np.flatnonzero(ob.axis_counts["H"]).tolist())
print("tokens with bad elements:", np.flatnonzero(ob.axis_counts["T"]).tolist())
print(report.warnings)

# %% The error over the two most telling axes (here T and H), and its distribution
png = None
try:
    fig = report.plot()
except ImportError as exc:       # matplotlib is the optional extra dsv4[plot]
    print(exc)
else:
    png = os.path.join(tempfile.mkdtemp(prefix="dsv4-"), "find_mismatch.png")
    fig.savefig(png, dpi=80)
    print("plot saved to", png)
