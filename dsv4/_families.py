"""Each kernel's family: dsv4.golden.<family> defines its golden, dsv4.specs.<family> its
input builder (and its COMPARATORS and CASES). dsv4.golden and dsv4.specs take their
names from here, so a kernel, of the C table or a Python-level driver, is one entry."""
import importlib

FAMILIES = {
    "qkv": ("rms_norm", "qkv_proj_rope", "decode_qkv_proj_rope", "prefill_qkv_proj_rope"),
    "hc": ("hc_pre", "hc_post", "hc_head"),
    "moe": ("gate", "expert_routed", "expert_shared", "moe"),
    "attention": ("prefill_sparse_attn", "decode_sparse_attn", "decode_sparse_attn_hca",
                  "decode_sparse_attn_swa"),
    "compressor": ("decode_compressor_ratio4", "decode_compressor_ratio128",
                   "prefill_compressor_ratio4", "prefill_compressor_ratio128"),
    "indexer": ("decode_indexer_compressor", "prefill_indexer_compressor", "decode_indexer",
                "prefill_indexer"),
    "blocks": ("decode_attention_swa", "decode_attention_hca", "decode_attention_csa",
               "prefill_attention_swa", "prefill_attention_hca", "prefill_attention_csa"),
    "layers": ("decode_layer", "prefill_layer"),
    "mtp": ("mtp_projection", "lm_head", "prefill_mtp"),
    "forward": ("decode_fwd", "prefill_fwd"),
}
NAMES = tuple(name for names in FAMILIES.values() for name in names)


def load(package):
    """{family: module} of `package` (dsv4.golden or dsv4.specs), every family imported
    before the caller binds a kernel name that a module name may share (moe)."""
    return {family: importlib.import_module(f"{package}.{family}") for family in FAMILIES}
