"""DeepSeek-V4 model presets and the deployment/implementation constants.

Field names follow the HuggingFace ``config.json`` of the model, with the nested
``rope_scaling.*`` and ``quantization_config.*`` entries flattened into the top
level. Three presets exist: ``DEMO`` (a small test model), ``FLASH`` (the one
every kernel golden is built for) and ``PRO``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class DeepSeekV4Config:
    """Immutable description of one DeepSeek-V4 model variant.

    Every field is required; the groups below mirror the layout of the
    HuggingFace configuration. Instances are hashable, so they can serve as
    cache keys.
    """

    name: str

    # attention / hidden
    hidden_size: int
    num_attention_heads: int
    head_dim: int  # also the MLA value-head width
    qk_rope_head_dim: int  # rotary slice at the tail of each head
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    sliding_window: int
    rms_norm_eps: float
    vocab_size: int

    # mixture of experts
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    scoring_func: str  # "softmax" | "sigmoid" | "sqrtsoftplus"
    routed_scaling_factor: float
    swiglu_limit: float  # 0 disables the clamp

    # layers
    num_hidden_layers: int
    num_hash_layers: int  # leading layers routed by token hash
    num_nextn_predict_layers: int
    compress_ratios: Tuple[int, ...]  # one entry per layer plus the MTP layer

    # lightning indexer
    index_n_heads: int
    index_head_dim: int
    index_topk: int

    # hyper-connections
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float

    # context length / RoPE (rope_scaling.* flattened)
    max_position_embeddings: int
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    beta_fast: int
    beta_slow: int
    original_max_position_embeddings: int  # 0 turns YaRN off

    # quantisation (quantization_config.* flattened; decode kernels ignore it)
    dtype: str
    scale_fmt: Optional[str]
    expert_dtype: Optional[str]  # None: experts use `dtype`
    scale_dtype: str

    # deployment
    max_batch_size: int

    def __post_init__(self) -> None:
        # A list would make the instance unhashable; normalise to a tuple.
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))

    @property
    def nope_head_dim(self) -> int:
        """Width of the non-rotary part of a head."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale ``head_dim ** -0.5`` (Python double)."""
        return self.head_dim ** -0.5

    @property
    def index_nope_head_dim(self) -> int:
        """Width of the non-rotary part of an indexer head."""
        return self.index_head_dim - self.qk_rope_head_dim

    @property
    def index_weights_scale(self) -> float:
        """Indexer score scale ``index_head_dim**-0.5 * index_n_heads**-0.5``."""
        return self.index_head_dim ** -0.5 * self.index_n_heads ** -0.5

    @property
    def hc_dim(self) -> int:
        """Width of the flattened hyper-connection state (``hc_mult * hidden_size``)."""
        return self.hc_mult * self.hidden_size

    @property
    def mix_hc(self) -> int:
        """Number of HC mixing coefficients per token: pre + post + hc_mult x hc_mult."""
        return (2 + self.hc_mult) * self.hc_mult


DEMO = DeepSeekV4Config(
    name="demo",
    hidden_size=4096,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    o_lora_rank=1024,
    o_groups=8,
    sliding_window=128,
    rms_norm_eps=1e-6,
    vocab_size=129280,
    moe_intermediate_size=4096,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.0,
    swiglu_limit=0.0,
    num_hidden_layers=8,
    num_hash_layers=0,
    num_nextn_predict_layers=1,
    compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0),
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    compress_rope_theta=40000.0,
    rope_factor=40.0,  # unused: original_max_position_embeddings is 0
    beta_fast=32,
    beta_slow=1,
    original_max_position_embeddings=0,
    dtype="fp8",
    scale_fmt="ue8m0",
    expert_dtype=None,
    scale_dtype="fp8",
    max_batch_size=4,
)

FLASH = DeepSeekV4Config(
    name="flash",
    hidden_size=4096,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    o_lora_rank=1024,
    o_groups=8,
    sliding_window=128,
    rms_norm_eps=1e-6,
    vocab_size=129280,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=6,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    num_hidden_layers=43,
    num_hash_layers=3,
    num_nextn_predict_layers=1,
    # two SWA layers, alternating CSA/HCA, then a final CSA and the MTP layer
    compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0),
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    # sized for an 8k prompt plus decode steps; the released model allows 1M
    max_position_embeddings=16384,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_factor=16.0,
    beta_fast=32,
    beta_slow=1,
    original_max_position_embeddings=65536,
    dtype="fp8",
    scale_fmt="ue8m0",
    expert_dtype="fp4",
    scale_dtype="fp8",
    max_batch_size=4,
)

PRO = DeepSeekV4Config(
    name="pro",
    hidden_size=7168,
    num_attention_heads=128,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1536,
    o_lora_rank=1024,
    o_groups=16,
    sliding_window=128,
    rms_norm_eps=1e-6,
    vocab_size=129280,
    moe_intermediate_size=3072,
    n_routed_experts=384,
    n_shared_experts=1,
    num_experts_per_tok=6,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=2.5,
    swiglu_limit=10.0,
    num_hidden_layers=61,
    num_hash_layers=3,
    num_nextn_predict_layers=1,
    # two HCA layers, alternating CSA/HCA, then a final CSA and the MTP layer
    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    index_n_heads=64,
    index_head_dim=128,
    index_topk=1024,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    max_position_embeddings=1048576,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_factor=16.0,
    beta_fast=32,
    beta_slow=1,
    original_max_position_embeddings=65536,
    dtype="fp8",
    scale_fmt="ue8m0",
    expert_dtype=None,
    scale_dtype="fp8",
    max_batch_size=4,
)

PRESETS = {"demo": DEMO, "flash": FLASH, "pro": PRO}


def get_config(config=None) -> DeepSeekV4Config:
    """Resolve ``config`` to a :class:`DeepSeekV4Config`.

    * ``None`` -> ``FLASH`` (the preset every kernel is built for);
    * a ``str`` -> the preset of that name, case-insensitive; an unknown name
      raises ``ValueError`` listing the valid names;
    * a ``DeepSeekV4Config`` -> returned unchanged;
    * anything else raises ``TypeError``.
    """
    if config is None:
        return FLASH
    if isinstance(config, DeepSeekV4Config):
        return config
    if isinstance(config, str):
        preset = PRESETS.get(config.lower())
        if preset is None:
            valid = ", ".join(repr(k) for k in PRESETS)
            raise ValueError(f"unknown config preset {config!r}; valid names: {valid}")
        return preset
    raise TypeError(
        "config must be None, a preset name (str) or a DeepSeekV4Config, "
        f"got {type(config).__name__}"
    )


# ---- deployment constants (§1.4) ----
DECODE_BATCH = 8  # requests per decode step
DECODE_SEQ = 1  # one new token per request per step
DECODE_TOKENS = DECODE_BATCH * DECODE_SEQ
DECODE_START_POS = 8192  # default absolute position of the decode token in tests
PREFILL_BATCH = 1
PREFILL_SEQ = 128  # one prefill tile
PREFILL_TOKENS = PREFILL_BATCH * PREFILL_SEQ
# Decode sizing by default; the prefill entry points rebind it to PREFILL_TOKENS
# before the MoE kernels are imported.
MOE_TOKENS = DECODE_TOKENS

# ---- implementation constants (§1.5) ----
BLOCK_SIZE = 128  # paged-KV page size, also the weight-quant block size
C4A_COMPRESSOR_BLOCK_SIZE = 4  # page size of the ratio-4 compressor state
C128_COMPRESSOR_BLOCK_SIZE = 8  # page size of the ratio-128 compressor state
LM_HEAD_TP_SIZE = 8  # upper bound on LM-head tensor parallelism

# Paged-cache pools. Prefill shares the decode-batch-sized physical pools
# because serving slot ids address the decode layout.
KV_ORI_MAX_BLOCKS = 1  # pages/request, uncompressed window KV
KV_CMP_MAX_BLOCKS = 32  # pages/request, compressed KV
IDX_CACHE_MAX_BLOCKS = 64  # pages/request, indexer cache
DECODE_ORI_BLOCK_NUM = DECODE_BATCH * KV_ORI_MAX_BLOCKS
DECODE_CMP_BLOCK_NUM = DECODE_BATCH * KV_CMP_MAX_BLOCKS
DECODE_IDX_BLOCK_NUM = DECODE_BATCH * IDX_CACHE_MAX_BLOCKS
PREFILL_ORI_MAX_BLOCKS = (PREFILL_SEQ + BLOCK_SIZE - 1) // BLOCK_SIZE  # ceil(S / page)
PREFILL_ORI_BLOCK_NUM = PREFILL_BATCH * PREFILL_ORI_MAX_BLOCKS
PREFILL_CMP_MAX_BLOCKS = KV_CMP_MAX_BLOCKS
PREFILL_CMP_BLOCK_NUM = DECODE_CMP_BLOCK_NUM  # shared pool
PREFILL_IDX_MAX_BLOCKS = IDX_CACHE_MAX_BLOCKS
PREFILL_IDX_BLOCK_NUM = DECODE_IDX_BLOCK_NUM  # shared pool

# ---- INT8 and masking constants (§1.6) ----
INT8_SCALE_MAX = 127.0  # keeps |q| <= 127, so -128 never occurs
INT8_AMAX_EPS = 1e-4  # amax floor for all-zero rows; used as f32(1e-4)
FP32_NEG_INF = -3.4028234663852886e38  # most negative finite fp32, a masking value that stays finite

# ---- expert parallelism / receive buffers (§1.7) ----
EP_WORLD_SIZE = 8
# A source rank sends at most one row per token to a given expert (top-k picks
# distinct experts), so a buffer needs EP_WORLD_SIZE lanes of T rows.
DECODE_RECV_MAX = EP_WORLD_SIZE * DECODE_TOKENS
PREFILL_RECV_MAX = EP_WORLD_SIZE * PREFILL_TOKENS
RECV_MAX = DECODE_RECV_MAX
