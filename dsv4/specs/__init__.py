"""Seeded input builders: dsv4.specs.<kernel>(..., seed=0, config=None) -> dict of inputs
keyed by pypto-lib's tensor names, ready for dsv4.<kernel>(**inputs).

Also, per kernel, pypto-lib's comparator for each output (COMPARATORS) and the
deployment cases `python -m dsv4 check` runs (CASES).
"""
from . import attention, hc, qkv
from . import blocks as _blocks
from . import compressor as _compressor
from . import indexer as _indexer
from . import layers as _layers
from . import moe as _moe
from . import mtp as _mtp
from . import forward as _forward
from .attention import (
    decode_sparse_attn, decode_sparse_attn_hca, decode_sparse_attn_swa, prefill_sparse_attn,
)
from .blocks import (
    decode_attention_csa, decode_attention_hca, decode_attention_swa, prefill_attention_csa,
    prefill_attention_hca, prefill_attention_swa,
)
from .compressor import (
    decode_compressor_ratio4, decode_compressor_ratio128, prefill_compressor_ratio4,
    prefill_compressor_ratio128,
)
from .hc import hc_head, hc_post, hc_pre
from .indexer import (
    decode_indexer, decode_indexer_compressor, prefill_indexer, prefill_indexer_compressor,
)
from .moe import expert_routed, expert_shared, gate, moe
from .mtp import lm_head, mtp_projection, prefill_mtp
from .layers import decode_layer, prefill_layer
from .forward import decode_fwd, prefill_fwd
from .qkv import decode_qkv_proj_rope, prefill_qkv_proj_rope, qkv_proj_rope, rms_norm

COMPARATORS = {**qkv.COMPARATORS, **hc.COMPARATORS, **_moe.COMPARATORS,
               **attention.COMPARATORS, **_indexer.COMPARATORS, **_compressor.COMPARATORS,
               **_blocks.COMPARATORS}
COMPARATORS.update(_layers.COMPARATORS)
COMPARATORS.update(_mtp.COMPARATORS)
COMPARATORS.update(_forward.COMPARATORS)
CASES = {**qkv.CASES, **hc.CASES, **_moe.CASES, **attention.CASES, **_indexer.CASES,
         **_compressor.CASES, **_blocks.CASES}
CASES.update(_layers.CASES)
CASES.update(_mtp.CASES)
CASES.update(_forward.CASES)

__all__ = ["rms_norm", "qkv_proj_rope", "decode_qkv_proj_rope", "prefill_qkv_proj_rope",
           "hc_pre", "hc_post", "hc_head", "gate", "expert_routed", "expert_shared", "moe",
           "prefill_sparse_attn", "decode_sparse_attn", "decode_sparse_attn_hca",
           "decode_sparse_attn_swa", "decode_indexer_compressor", "prefill_indexer_compressor",
           "decode_indexer", "prefill_indexer",
           "decode_compressor_ratio4", "decode_compressor_ratio128", "prefill_compressor_ratio4",
           "prefill_compressor_ratio128", "decode_attention_swa", "decode_attention_hca",
           "decode_attention_csa", "prefill_attention_swa", "prefill_attention_hca",
           "prefill_attention_csa", "COMPARATORS", "CASES"]
__all__ += ["decode_layer", "prefill_layer", "mtp_projection", "lm_head", "prefill_mtp",
            "decode_fwd", "prefill_fwd"]
