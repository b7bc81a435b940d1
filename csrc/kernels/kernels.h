/* Argument structs and entry points of every kernel. Fields are named after
 * pypto-lib's tensors; sizes are int64_t; pointers are const unless written.
 * `variant` is set from the kernel table; `scratch` is sized by prepare().
 * A field's type is the one declaration of its argument's dtype: the kernel
 * table in module.c reads it from here (and does not compile if a row's role
 * disagrees with the field's constness). */
#ifndef DSV4_KERNELS_H
#define DSV4_KERNELS_H

#include "core/dsv4.h"

/* prepare() checks what the table cannot (relations between dims, index
 * ranges), sets derived dims and returns 0, or writes a message and returns
 * DSV4_EVALUE. It never writes to a tensor. The kernel itself returns 0, or
 * DSV4_EVALUE for a condition only the computation reveals (e.g. a routing
 * that overflows a receive buffer), found before any output is written. */
enum { DSV4_OK = 0, DSV4_EVALUE = 1 };
struct dsv4_err { char msg[512]; };

/* e = "<prefix>: <inner's message>", cut to fit */
static inline int dsv4_err_prefixed(struct dsv4_err *e, const char *prefix, const struct dsv4_err *inner)
{
    size_t n = strlen(prefix) < sizeof e->msg - 3 ? strlen(prefix) : sizeof e->msg - 3;
    memcpy(e->msg, prefix, n);
    e->msg[n++] = ':';
    e->msg[n++] = ' ';
    size_t len = strlen(inner->msg), room = sizeof e->msg - n - 1;
    memcpy(e->msg + n, inner->msg, len < room ? len : room);
    e->msg[n + (len < room ? len : room)] = 0;
    return DSV4_EVALUE;
}

/* An optional num_tokens: INT64_MAX (not given) means all T rows; else it must lie in [0, T]. */
int dsv4_resolve_num_tokens(int64_t *num_tokens, int64_t T, struct dsv4_err *e);

/* ---- rms_norm: x_normed[t, d] = bf16((x[t, d] * rsqrt(mean_d x^2 + eps)) * norm_w[d]) */
struct dsv4_rms_norm_args {
    const bf16_t *x;          /* [T, D] */
    const bf16_t *norm_w;     /* [D] */
    bf16_t *x_normed;         /* [T, D] */
    int64_t T, D;
    float rms_norm_eps;
    int variant;
    void *scratch;
};
int dsv4_rms_norm_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_rms_norm(void *a, struct dsv4_err *e);

/* ---- qkv_proj_rope and its two variants (spec 01 §5)
 *   A   = xn @ wq_a, qn = rmsnorm(A) * gamma_cq        -> qr, qr_scale (int8 per row)
 *   q   = headrms((qr @ wq_b) * qr_scale * wq_b_scale), RoPE on the last R columns
 *   kv  = rmsnorm(xn @ wkv) * gamma_ckv, RoPE on the last R columns
 * xn is x itself (qkv_proj_rope) or bf16(rmsnorm(x) * norm_w) (the variants,
 * which also round qn to bf16 before quantisation). The RoPE row of token t
 * is rope_cos[start_pos + t % S]. */
enum { DSV4_QKV_PLAIN = 0, DSV4_QKV_DECODE = 1, DSV4_QKV_PREFILL = 2 };
struct dsv4_qkv_proj_rope_args {
    const bf16_t *x;          /* [T, D] or [B, S, D] */
    const float *norm_w;      /* [D], variants only */
    const bf16_t *wq_a;       /* [D, Q] */
    const int8_t *wq_b;       /* [Q, H*HD] */
    const float *wq_b_scale;  /* [H*HD] */
    const bf16_t *wkv;        /* [D, HD] */
    const bf16_t *rope_cos;   /* [P, RW], only columns 0..R/2-1 are read */
    const bf16_t *rope_sin;
    const bf16_t *gamma_cq;   /* [Q] */
    const bf16_t *gamma_ckv;  /* [HD] */
    bf16_t *q;                /* [T, H, HD] */
    bf16_t *kv;               /* [T, HD] */
    int8_t *qr;               /* [T, Q] */
    float *qr_scale;          /* [T, 1] */
    int64_t B, S, T, D, Q, HHD, HD, H, P, RW;
    int64_t start_pos, qk_rope_head_dim;
    float rms_norm_eps;
    int variant;
    int nth;                  /* threads the scratch was sized for */
    void *scratch;
};
int dsv4_qkv_proj_rope_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_qkv_proj_rope(void *a, struct dsv4_err *e);

/* ---- hyper-connections (spec 01 §6-§8). K = HC*D, MIX = (2+HC)*HC.
 *   mix[t, m]  = (sum over 256-chunks, in order, of x[t] . fn[m]) * rsqrt(ss[t]/K + eps),
 *                ss = sum over 512-chunks, in order, of x[t]^2
 *   hc_pre:  pre = sigmoid(.)+eps, post = 2 sigmoid(.), comb = Sinkhorn(softmax(.)),
 *            x_mixed[t, d] = bf16_haz(sum_h, in order, x[t, h, d] * pre[t, h])
 *   hc_post: y[t, o, d] = bf16(x[t, d] post[t, o] + sum_i residual[t, i, d] comb[t, HC i + o])
 *   hc_head: y[t, d] = bf16_haz(pairwise sum_h x[t, h, d] * pre[t, h]) */
struct dsv4_hc_pre_args {
    const bf16_t *x;          /* [T, HC, D] */
    const float *hc_fn;       /* [MIX, K] */
    const float *hc_scale;    /* [3] */
    const float *hc_base;     /* [MIX] */
    bf16_t *x_mixed;          /* [T, D] */
    float *post;              /* [T, HC] */
    float *comb;              /* [T, HC*HC] */
    int64_t T, HC, D, MIX, K, HC2;
    int64_t hc_sinkhorn_iters;
    float rms_norm_eps, hc_eps;
    int variant;
    void *scratch;
};
int dsv4_hc_pre_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_hc_pre(void *a, struct dsv4_err *e);

struct dsv4_hc_post_args {
    const bf16_t *x;          /* [T, D] */
    const bf16_t *residual;   /* [T, HC, D] */
    const float *post;        /* [T, HC] */
    const float *comb;        /* [T, HC*HC] */
    bf16_t *y;                /* [T, HC, D] */
    int64_t T, HC, D, HC2;
    int variant;
    void *scratch;
};
int dsv4_hc_post_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_hc_post(void *a, struct dsv4_err *e);

struct dsv4_hc_head_args {
    const bf16_t *x_hc;       /* [T, HC, D] */
    const float *hc_head_fn;  /* [HC, K] */
    const float *hc_head_scale; /* [1] */
    const float *hc_head_base;  /* [HC] */
    bf16_t *y;                /* [T, D] */
    int64_t T, HC, D, K;
    float rms_norm_eps, hc_eps;
    int variant;
    void *scratch;
};
int dsv4_hc_head_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_hc_head(void *a, struct dsv4_err *e);

/* ---- mixture of experts (spec 05) ------------------------------------------------
 * gate: RMSNorm -> x_norm (bf16) -> int8 per row; scores sqrt(softplus(x_norm . gate_w));
 *       top-K of score + bias (stable) or tid2eid[input_ids] in hash layers;
 *       weights = score / sum(scores of the K) * routed_scaling_factor.
 * expert: y = bf16(W2 . q8(swiglu(W1 . x, W3 . x)) * scale [* routing weight]).
 * moe:  per rank hc_pre -> gate -> shared + routed experts -> combine -> hc_post. */
struct dsv4_gate_args {
    const bf16_t *x_mixed;    /* [T, D] */
    const bf16_t *norm_w;     /* [D] */
    const float *gate_w;      /* [E, D] */
    const float *gate_bias;   /* [E] */
    const int32_t *tid2eid;   /* [V, K] */
    const int64_t *input_ids; /* [T] */
    bf16_t *x_norm;           /* [T, D] */
    int8_t *x_norm_i8;        /* [T, D] */
    float *x_norm_scale;      /* [T, 1] */
    int32_t *indices;         /* [T, K] */
    float *weights;           /* [T, K] */
    int64_t T, D, E, V, K;
    int64_t layer_id, num_tokens, num_hash_layers, num_experts_per_tok;
    float rms_norm_eps, routed_scaling_factor;
    int variant;
    void *scratch;
};
int dsv4_gate_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_gate(void *a, struct dsv4_err *e);

struct dsv4_expert_shared_args {
    const int8_t *x_local_i8;        /* [T, D] */
    const float *x_local_scale_dq;   /* [T, 1] */
    const int8_t *shared_w1;         /* [I, D] */
    const float *shared_w1_scale;    /* [I] */
    const int8_t *shared_w3;         /* [I, D] */
    const float *shared_w3_scale;    /* [I] */
    const int8_t *shared_w2;         /* [D, I] */
    const float *shared_w2_scale;    /* [D] */
    bf16_t *sh;                      /* [T, D] */
    int64_t T, D, IE;            /* IE: expert width (moe_intermediate_size) */
    float swiglu_limit;
    int variant;
    void *scratch;
};
int dsv4_expert_shared_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_expert_shared(void *a, struct dsv4_err *e);

struct dsv4_expert_routed_args {
    const int8_t *recv_x;            /* [E, M, D] */
    const float *recv_scale_dq;      /* [E, M] */
    const float *recv_weights;       /* [E, M] */
    const int32_t *recv_expert_count; /* [E, 1] */
    const int8_t *routed_w1;         /* [E, I, D] */
    const float *routed_w1_scale;    /* [E, I] */
    const int8_t *routed_w3;         /* [E, I, D] */
    const float *routed_w3_scale;    /* [E, I] */
    const int8_t *routed_w2;         /* [E, D, I] */
    const float *routed_w2_scale;    /* [E, D] */
    bf16_t *recv_y;                  /* [E, M, D] */
    int64_t E, M, D, IE;
    float swiglu_limit;
    int variant;
    void *scratch;
};
int dsv4_expert_routed_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_expert_routed(void *a, struct dsv4_err *e);

struct dsv4_moe_args {
    const bf16_t *x_hc;              /* [R, T, HC, D] */
    const float *hc_ffn_fn;          /* [R, MIX, HC*D] */
    const float *hc_ffn_scale;       /* [R, 3] */
    const float *hc_ffn_base;        /* [R, MIX] */
    const bf16_t *norm_w;            /* [R, D] */
    const float *gate_w;             /* [R, E, D] */
    const float *gate_bias;          /* [R, E] */
    const int32_t *tid2eid;          /* [R, V, K] */
    const int64_t *input_ids;        /* [R, T] */
    const int8_t *routed_w1;         /* [R, EL, I, D] */
    const float *routed_w1_scale;    /* [R, EL, I] */
    const int8_t *routed_w3;
    const float *routed_w3_scale;
    const int8_t *routed_w2;         /* [R, EL, D, I] */
    const float *routed_w2_scale;    /* [R, EL, D] */
    const int8_t *shared_w1;         /* [R, I, D] */
    const float *shared_w1_scale;    /* [R, I] */
    const int8_t *shared_w3;
    const float *shared_w3_scale;
    const int8_t *shared_w2;         /* [R, D, I] */
    const float *shared_w2_scale;    /* [R, D] */
    bf16_t *x_next;                  /* [R, T, HC, D] */
    int64_t R, T, HC, D, MIX, HCD, E, V, K, EL, IE;
    int64_t layer_id, num_tokens, num_hash_layers, num_experts_per_tok, hc_sinkhorn_iters;
    float rms_norm_eps, hc_eps, routed_scaling_factor, swiglu_limit;
    int variant;
    void *scratch;
};
int dsv4_moe_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_moe(void *a, struct dsv4_err *e);

/* ---- sparse attention (spec 03) ----------------------------------------------------
 * O[t, h] = softmax over the token's KV rows (+ a sink logit) of q.k * HD^-0.5, times the
 * rows, tile by tile; inverse RoPE; attn_out = bf16(sum_g dq(int8(O_g . wo_a[g]) . wo_b_g)). */
enum { DSV4_ATTN_PREFILL, DSV4_ATTN_DECODE, DSV4_ATTN_SWA };
struct dsv4_sparse_attn_args {
    const bf16_t *q;                    /* [T, H, HD] */
    const bf16_t *ori_kv;               /* [OB, BLOCK, 1, HD] ring pages */
    const int32_t *ori_block_table;     /* prefill [OM], decode [B, OM] */
    const bf16_t *kv_overlay;           /* [T, HD] the step's own KV rows */
    const bf16_t *cmp_kv;               /* [CB, BLOCK, 1, HD] compressed pages */
    const int32_t *cmp_block_table;     /* prefill [CM], decode [B, CM] */
    const int32_t *cmp_sparse_indices;  /* [T, K] raw indices */
    const int32_t *cmp_sparse_lens;     /* [T], prefill only */
    const float *attn_sink;             /* [H] */
    const bf16_t *freqs_cos, *freqs_sin; /* [T, RW] */
    const bf16_t *wo_a;                 /* [G, OL, OGI] */
    const int8_t *wo_b;                 /* [D, GOL] */
    const float *wo_b_scale;            /* [D] */
    bf16_t *attn_out;                   /* [T, D] */
    int64_t T, H, HD, OB, BLOCK, OM, B, CB, CM, K, RW, G, OL, OGI, D, GOL;
    int64_t num_tokens, sliding_window, index_topk, qk_rope_head_dim;
    int64_t S, PAD;
    int trusted;                        /* indices built by a block that checked every address */
    int variant;
    int nth;
    void *scratch;
};
int dsv4_sparse_attn_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_sparse_attn(void *a, struct dsv4_err *e);

/* ---- KV compressors (spec 04): variant = the ratio R (4 or 128). With a hadamard matrix
 * they are the indexer-key compressors: the entry is rounded to bf16 and multiplied
 * (row vector on the left) by it before it is written. */
struct dsv4_decode_compressor_args {
    const bf16_t *x;                    /* [B, S, D], S = 1 */
    float *kv;                          /* [B, S, HD] out: the fp32 entry of a committing request */
    float *compress_state;              /* [NB, PAGE, SW] inout: [kv | score + ape] per position */
    const int32_t *compress_state_block_table; /* [B, NP] */
    const bf16_t *wkv, *wgate;          /* [OD, D] */
    const float *ape;                   /* [R, OD] */
    const bf16_t *norm_w;               /* [HD] */
    const float *cos, *sin;             /* [B, R2] */
    bf16_t *cmp_kv_cache;               /* [NC, CBLK, 1, HD] inout */
    const int32_t *position_ids;        /* [B, S] */
    const int64_t *cmp_slot_mapping;    /* [B, S], -1: no write */
    const int64_t *state_slot_mapping;  /* [B, S], -1: no write */
    const bf16_t *hadamard;             /* [HD, HD], the indexer-key compressor only */
    int keep_kv;                        /* kv is a caller's state: rows without an entry stay */
    int64_t B, S, D, HD, OD, NB, PAGE, SW, NP, R, R2, NC, CBLK;
    int64_t qk_rope_head_dim;
    float rms_norm_eps;
    int variant;
    void *scratch;
};
int dsv4_decode_compressor_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_decode_compressor(void *a, struct dsv4_err *e);

struct dsv4_prefill_compressor_args {
    const bf16_t *x;                    /* [T, D] */
    float *kv_state, *score_state;      /* [NB, PAGE, OD] inout */
    const int32_t *compress_state_block_table; /* [NP] */
    const bf16_t *wkv, *wgate;          /* [OD, D] */
    const float *ape;                   /* [R, OD] */
    const bf16_t *norm_w;               /* [HD] */
    const bf16_t *freqs_cos, *freqs_sin; /* [MAXS, RW] */
    bf16_t *cmp_kv;                     /* [NC, CBLK, 1, HD] inout */
    const int32_t *position_ids;        /* [T] */
    const int64_t *cmp_slot_mapping;    /* [T], -1: the token completes no entry */
    const int64_t *state_slot_mapping;  /* [T], -1: no state write */
    const bf16_t *hadamard;             /* [HD, HD], the indexer-key compressor only */
    bf16_t *kv_out;                     /* [W, HD] the indexer keys in write order */
    int64_t T, D, OD, HD, NB, PAGE, NP, R, MAXS, RW, NC, CBLK, W;
    int64_t num_tokens, qk_rope_head_dim;
    float rms_norm_eps;
    int variant;
    void *scratch;
};
int dsv4_prefill_compressor_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_prefill_compressor(void *a, struct dsv4_err *e);

/* ---- lightning indexer (spec 04 §4.10): the inner indexer-key compressor commits this
 * call's keys, then every query's int8 heads score the visible compressed keys:
 *   decode  score = (sum_h relu(S32 qdq) Wt) kdq,  prefill score = sum_h relu(S32 qdq kdq) Wt
 * and the top index_topk slots (score descending, slot ascending) + offset are reported. */
struct dsv4_indexer_query {
    const int8_t *qr;                   /* [N, QL] */
    const float *qr_scale;              /* [N, 1] */
    const int8_t *wq_b;                 /* [QL, HHD] */
    const float *wq_b_scale;            /* [HHD] */
    const bf16_t *weights_proj;         /* [D, H] */
    const float *cos, *sin;             /* [N, R2] per-token rows */
    const int32_t *idx_block_table;     /* decode [B, NBT], prefill [NBT] */
    float *score;                       /* decode [B, S, SL], prefill [T, SL] */
    int32_t *topk_idxs;
    const int32_t *kv_seq_lens;         /* decode [B] */
    int64_t N, QL, HHD, H, R2q, NBT, SL, B2;
    int64_t offset, index_topk, index_n_heads, index_head_dim, max_position_embeddings,
        sliding_window;
    float index_weights_scale;
};
struct dsv4_decode_indexer_args {
    struct dsv4_decode_compressor_args c;   /* the inner compressor: x, states, cache, ... */
    struct dsv4_indexer_query q;
    int variant;
    void *scratch;
};
struct dsv4_prefill_indexer_args {
    struct dsv4_prefill_compressor_args c;
    struct dsv4_indexer_query q;
    int variant;
    void *scratch;
};
int dsv4_decode_indexer_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_decode_indexer(void *a, struct dsv4_err *e);
int dsv4_prefill_indexer_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_prefill_indexer(void *a, struct dsv4_err *e);

/* ---- attention blocks (spec 06 §2-§4): one call runs the leaf kernels in order,
 *   hc_pre -> rms_norm -> RoPE rows -> qkv_proj_rope -> (HCA, CSA) compressor
 *   -> (CSA) indexer -> sparse index rows -> sparse attention -> ring write-back -> hc_post
 * with every cache and state address checked in prepare(). variant = kind | PREFILL.
 * The stage tensors (x_mixed ... attn_out) are outputs the block always writes. */
enum { DSV4_BLOCK_SWA = 0, DSV4_BLOCK_HCA = 1, DSV4_BLOCK_CSA = 2, DSV4_BLOCK_PREFILL = 4 };
struct dsv4_attention_block_args {
    const bf16_t *x_hc;                         /* [T, HC, D] */
    const float *hc_attn_fn, *hc_attn_scale, *hc_attn_base;
    const bf16_t *attn_norm_w, *wq_a;
    const int8_t *wq_b;
    const float *wq_b_scale;
    const bf16_t *wkv, *gamma_cq, *gamma_ckv;
    const bf16_t *freqs_cos, *freqs_sin;        /* [MAXS, RW] */
    const bf16_t *cmp_wkv, *cmp_wgate;          /* main compressor */
    const float *cmp_ape;
    const bf16_t *cmp_norm_w;
    float *compress_state;                      /* decode: [kv | score] rows */
    float *cmp_kv_state, *cmp_score_state;      /* prefill */
    const int32_t *compress_state_block_table;
    const int8_t *idx_wq_b;                     /* indexer */
    const float *idx_wq_b_scale;
    const bf16_t *weights_proj, *hadamard_idx;
    const bf16_t *inner_wkv, *inner_wgate;
    const float *inner_ape;
    const bf16_t *inner_norm_w;
    float *inner_compress_state;                /* decode */
    float *inner_kv_state, *inner_score_state;  /* prefill */
    const int32_t *inner_compress_state_block_table;
    bf16_t *kv_cache;                           /* [OB, BLOCK, 1, HD] window ring */
    const int32_t *ori_block_table;             /* decode [B, OM], prefill [OM] */
    bf16_t *cmp_kv;                             /* [CB, BLOCK, 1, HD] */
    const int32_t *cmp_block_table;             /* decode [B, CM], prefill [CM] */
    bf16_t *idx_kv_cache;                       /* [NI, BLOCK, 1, IHD] */
    const int32_t *idx_block_table;
    const int64_t *ori_slot_mapping, *cmp_slot_mapping, *idx_slot_mapping, *state_slot_mapping,
        *inner_state_slot_mapping;              /* [T] */
    const int32_t *position_ids;                /* [T] */
    const int32_t *kv_seq_lens;                 /* [B], decode HCA and CSA */
    const int32_t *cmp_sparse_indices, *cmp_sparse_lens;   /* prefill SWA and HCA */
    const float *attn_sink;
    const bf16_t *wo_a;
    const int8_t *wo_b;
    const float *wo_b_scale;
    bf16_t *x_out;                              /* [T, HC, D] */
    /* stages */
    bf16_t *x_mixed, *x_normed, *q, *kv, *attn_out;
    float *post, *comb, *qr_scale, *compressed_kv;
    int8_t *qr;
    int32_t *topk_idxs, *sparse_indices, *sparse_lens;
    int64_t T, HC, D, MIX, HCD, HC2, Q, HHD, HD, H, MAXS, RW;
    int64_t COD, CR, CNB, CPAGE, CSW, CNP;
    int64_t IHHD, IH, IHD, IOD, IR, INB, IPAGE, ISW, INP, ISL;
    int64_t OB, BLOCK, B, OM, CB, CM, NI, NBT, K, G, OL, OGI, GOL;
    int64_t num_tokens;
    int64_t sliding_window, qk_rope_head_dim, index_topk, index_n_heads, index_head_dim,
        max_position_embeddings, hc_sinkhorn_iters;
    float rms_norm_eps, hc_eps, index_weights_scale;
    int variant;
    void *scratch;
    /* the leaf kernels, set up by prepare() */
    struct dsv4_hc_pre_args hp;
    struct dsv4_rms_norm_args rn;
    struct dsv4_qkv_proj_rope_args qk;
    struct dsv4_decode_compressor_args dc;
    struct dsv4_prefill_compressor_args pc;
    struct dsv4_decode_indexer_args di;
    struct dsv4_prefill_indexer_args pi;
    struct dsv4_sparse_attn_args sa;
    struct dsv4_hc_post_args ho;
    size_t leaf_scratch;
};
int dsv4_attention_block_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_attention_block(void *a, struct dsv4_err *e);
/* Point a block's stage tensors (which it always writes) into p, or with p = NULL only
 * measure them; returns the bytes they take. */
size_t dsv4_attention_block_stages(struct dsv4_attention_block_args *b, void *p);

/* ---- layers (spec 06 §5, §6): the attention block of the layer's kind on every rank,
 * then the MoE across the R ranks. compress_ratio (0, 4, 128) is the layer's entry of
 * the config's compress_ratios, -1 if layer_id is outside them. blk holds rank 0's view
 * of the attention tensors (the binding fills it); the HCA and CSA compressors' tensors
 * have names of their own, one set of each. */
struct dsv4_layer_cmp {
    const bf16_t *wkv, *wgate;
    const float *ape;
    const bf16_t *norm_w;
    float *state, *kv_state, *score_state;  /* decode: state; prefill: kv_state, score_state */
    const int32_t *table;
    const int64_t *cmp_slot_mapping, *state_slot_mapping;
    int64_t OD, R, NB, PAGE, SW, NP;
};
struct dsv4_layer_args {
    struct dsv4_attention_block_args blk;
    struct dsv4_layer_cmp hca, csa;
    struct dsv4_moe_args moe;
    const int32_t *seq_lens, *chunk_lens, *chunk_offsets, *chunk_tile_offsets;   /* prefill */
    bf16_t *x_attn;                         /* stage: [R, T, HC, D] the attention outputs */
    struct {                                /* stages: [R, T, ...] the blocks' per-token ones */
        bf16_t *x_mixed, *x_normed, *q, *kv, *attn_out;
        float *post, *comb, *qr_scale;
        int8_t *qr;
    } st;
    int64_t R, NREQ, layer_id, compress_ratio, num_hidden_layers;
    size_t stage_size, work_size, undo_size;   /* set by prepare() */
    int variant;                            /* 0 decode, 1 prefill */
    void *scratch;
};
int dsv4_layer_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_layer(void *a, struct dsv4_err *e);

/* ---- MTP projection and LM head (spec 06 §8.1, §9) ----------------------------------
 * mtp_projection: each row (hidden token; prev token and lane) is normalised,
 *   v = ((x * rsqrt(sum over 128-chunks, in order, of x^2 * (1/D) + eps)) * norm_w) * smooth,
 *   quantised per row to int8 (codes clamped: a NaN code is -127) and projected exactly,
 *   hidden_states_out[t, h, n] = bf16((E[t, n] dq_e[t]) e_scale[n] + (H[t, h, n] dq_h[t, h]) h_scale[n])
 * lm_head: logits[o, t, p*VS + v] = sum_k hidden[o, t, k] * weight[p, v, k] in fp32, each
 *   summed over k in order whatever T (so a token's logits do not depend on the batch). */
struct dsv4_mtp_projection_args {
    const bf16_t *hidden_states;      /* [T, D] */
    const bf16_t *prev_hidden_states; /* [T, HC, D] */
    const float *enorm_w, *hnorm_w;   /* [D] */
    const int8_t *e_proj_w;           /* [D, D] rows = outputs */
    const float *e_proj_w_scale;      /* [D] */
    const float *e_proj_smooth;       /* [D] */
    const int8_t *h_proj_w;
    const float *h_proj_w_scale;
    const float *h_proj_smooth;
    bf16_t *hidden_states_out;        /* [T, HC, D] */
    int64_t T, HC, D;
    float rms_norm_eps;
    int variant;
    void *scratch;
};
int dsv4_mtp_projection_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_mtp_projection(void *a, struct dsv4_err *e);

struct dsv4_lm_head_args {
    const bf16_t *hidden_states;      /* [R, T, D] */
    const bf16_t *lm_head_weight;     /* [P, VS, D] */
    float *logits;                    /* [R, T, V], V = P * VS */
    int64_t R, T, D, P, VS, V;
    int variant;
    void *scratch;
};
int dsv4_lm_head_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_lm_head(void *a, struct dsv4_err *e);

/* ---- prefill_mtp (spec 06 §8.2): on each of R ranks mtp_projection -> the prefill SWA
 * attention block (kv_cache[r] in place); the MoE across the ranks at layer_id =
 * num_hidden_layers; on each rank hc_head (mtp_hc_head_*) -> rms_norm (mtp_norm_w).
 * proj, blk and head hold rank 0's view of their tensors (the binding fills them). */
struct dsv4_prefill_mtp_args {
    struct dsv4_mtp_projection_args proj;
    struct dsv4_attention_block_args blk;
    struct dsv4_moe_args moe;              /* x_next: pre_hc_hidden_out [R, T, HC, D] */
    struct dsv4_hc_head_args head;         /* mtp_hc_head_fn [R, HC, HCD], _scale [R, 1], _base [R, HC] */
    const bf16_t *mtp_norm_w;              /* [R, D] */
    bf16_t *hidden_out;                    /* [R, T, D] */
    bf16_t *projected, *x_attn, *x_head;   /* stages: [R, T, HC, D], [R, T, HC, D], [R, T, D] */
    int64_t R, num_tokens, num_hidden_layers;
    size_t stage_size, work_size, undo_size;   /* set by prepare() */
    int variant;
    void *scratch;
};
int dsv4_prefill_mtp_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_prefill_mtp(void *a, struct dsv4_err *e);

/* ---- numerics core, exposed for testing ------------------------------------ */
enum { DSV4_CAST_BF16, DSV4_CAST_BF16_HAZ, DSV4_CAST_FP8, DSV4_CAST_FP8_F32, DSV4_CAST_EXP };
struct dsv4_cast_args {
    const void *x;            /* [N] */
    void *y;                  /* [N] */
    int64_t N;
    int variant;
    void *scratch;
};
int dsv4_cast_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_cast(void *a, struct dsv4_err *e);

struct dsv4_quant_int8_args {
    const float *x;           /* [M, N] */
    int8_t *y;                /* [M, N] */
    float *scale;             /* [M, 1] */
    int64_t M, N;
    int variant;
    void *scratch;
};
int dsv4_quant_int8_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_quant_int8(void *a, struct dsv4_err *e);

enum { DSV4_MATMUL_BF16, DSV4_MATMUL_I8, DSV4_MATMUL_I8_NT };
struct dsv4_matmul_args {
    const void *a;            /* [M, K] */
    const void *b;            /* [K, N]; [N, K] for I8_NT */
    void *c;                  /* [M, N] fp32 or int32 */
    int64_t M, K, N;
    int variant;
    void *scratch;
};
int dsv4_matmul_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_matmul(void *a, struct dsv4_err *e);

struct dsv4_rope_args {
    const float *x;           /* [M, R] */
    const bf16_t *cos;        /* [M, RW] */
    const bf16_t *sin;
    bf16_t *y;                /* [M, R] */
    int64_t M, R, RW;
    int variant;              /* 1: inverse rotation */
    void *scratch;
};
int dsv4_rope_prepare(void *a, struct dsv4_err *e, size_t *scratch);
int dsv4_rope(void *a, struct dsv4_err *e);

#endif
