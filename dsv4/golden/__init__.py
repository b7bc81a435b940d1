"""NumPy goldens: dsv4.golden.<kernel> mirrors dsv4.<kernel> argument for argument.

Written for reading: plain NumPy in pypto-lib's step order, every rounding
point a call into dsv4.golden.numerics.
"""
from . import numerics
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
from .qkv import decode_qkv_proj_rope, prefill_qkv_proj_rope, qkv_proj_rope, rms_norm

__all__ = ["numerics", "rms_norm", "qkv_proj_rope", "decode_qkv_proj_rope", "prefill_qkv_proj_rope",
           "hc_pre", "hc_post", "hc_head", "gate", "expert_routed", "expert_shared", "moe",
           "prefill_sparse_attn", "decode_sparse_attn", "decode_sparse_attn_hca",
           "decode_sparse_attn_swa",
           "decode_compressor_ratio4", "decode_compressor_ratio128", "prefill_compressor_ratio4",
           "prefill_compressor_ratio128",
           "decode_indexer_compressor", "prefill_indexer_compressor", "decode_indexer",
           "prefill_indexer", "decode_attention_swa", "decode_attention_hca",
           "decode_attention_csa", "prefill_attention_swa", "prefill_attention_hca",
           "prefill_attention_csa"]
from .layers import decode_layer, prefill_layer
from .forward import decode_fwd, prefill_fwd

__all__ += ["decode_layer", "prefill_layer", "mtp_projection", "lm_head", "prefill_mtp",
            "decode_fwd", "prefill_fwd"]

# torch tensors in, torch tensors out, as for the C kernels
from .._kernels import dlpack_io  # noqa: E402

for _name in __all__:
    if _name != "numerics":
        globals()[_name] = dlpack_io(globals()[_name])
