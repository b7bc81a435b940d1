/* Attention blocks (spec chapter 06 §2-§4): decode and prefill x SWA, HCA, CSA.
 *
 * One call runs the leaf kernels of the other families in pypto-lib's order (§2.1) and
 * the glue between them: the tokens' RoPE rows, the compressed rows' RoPE values, the
 * sparse index rows, the ring write-back. The leaves are set up once in prepare(), which
 * also checks every address the block will write or read (slots, block tables, pages),
 * so that a call either raises before anything is written or runs to the end. */
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "kernels/kernels.h"

#define TILE 128                       /* the sparse attention's tile of KV rows */

static int kind(const struct dsv4_attention_block_args *a) { return a->variant & 3; }
static int prefill(const struct dsv4_attention_block_args *a) { return a->variant & DSV4_BLOCK_PREFILL; }

/* HCA decode: the most compressed rows a token attends (HCA_TOPK_LIMIT) */
static int64_t hca_limit(const struct dsv4_attention_block_args *a)
{
    int64_t l = a->max_position_embeddings / 128;
    return l < a->index_topk ? l : a->index_topk;
}

/* Compressed slots token t may read: decode HCA / CSA, prefill CSA (a bound, for checks) */
static int64_t visible(const struct dsv4_attention_block_args *a, int64_t t)
{
    const int64_t p = a->position_ids[t], b = prefill(a) ? 0 : t / (a->T / a->B);
    if (kind(a) == DSV4_BLOCK_HCA) {
        int64_t v = (p + 1) / 128, l = a->kv_seq_lens[b] / 128;
        v = v < l ? v : l;
        return v < hca_limit(a) ? v : hca_limit(a);
    }
    int64_t v = (p + 1) / 4;
    if (!prefill(a)) {
        int64_t l = a->kv_seq_lens[b] / 4;
        v = v < l ? v : l;
    }
    return v < a->ISL ? v : a->ISL;
}

/* ---- scratch: the glue's buffers, then one region every leaf uses in turn ---------- */

struct block_scratch {
    bf16_t *cos, *sin;                 /* [T, RW] the tokens' RoPE rows */
    float *ccos, *csin;                /* [B, R2] the compressed row's RoPE values */
    float *icos, *isin;                /* decode [B, R2] / prefill [T, R2] the indexer query's */
    float *inner_kv;                   /* [B, IHD] */
    float *score;                      /* decode [B, ISL] / prefill [T, ISL] */
    bf16_t *zero_page;                 /* [BLOCK, HD]: prefill SWA's empty compressed pool */
    void *leaf;
};

#define ZERO_TABLE 32                  /* PREFILL_CMP_MAX_BLOCKS */
static const int32_t zero_table[ZERO_TABLE];

static void block_layout(const struct dsv4_attention_block_args *a, struct dsv4_arena *ar,
                         struct block_scratch *s)
{
    const int64_t T = a->T, R2 = a->RW / 2, N = prefill(a) ? T : a->B;
    memset(s, 0, sizeof *s);
    s->cos = dsv4_take(ar, (size_t)T * a->RW * sizeof(bf16_t));
    s->sin = dsv4_take(ar, (size_t)T * a->RW * sizeof(bf16_t));
    if (kind(a) != DSV4_BLOCK_SWA && !prefill(a)) {
        s->ccos = dsv4_take(ar, (size_t)a->B * R2 * sizeof(float));
        s->csin = dsv4_take(ar, (size_t)a->B * R2 * sizeof(float));
    }
    if (kind(a) == DSV4_BLOCK_CSA) {
        s->icos = dsv4_take(ar, (size_t)N * R2 * sizeof(float));
        s->isin = dsv4_take(ar, (size_t)N * R2 * sizeof(float));
        s->inner_kv = dsv4_take(ar, (size_t)N * a->IHD * sizeof(float));
        s->score = dsv4_take(ar, (size_t)N * a->ISL * sizeof(float));
    }
    if (kind(a) == DSV4_BLOCK_SWA && prefill(a)) {
        s->zero_page = dsv4_take(ar, (size_t)a->BLOCK * a->HD * sizeof(bf16_t));
    }
    s->leaf = dsv4_take(ar, a->leaf_scratch);
}

/* ---- the leaves ------------------------------------------------------------------ */

/* Fill the leaves' arguments from the block's; pointers into the scratch come from s
 * (NULL in prepare, where no leaf reads them). */
static void setup_leaves(struct dsv4_attention_block_args *a, const struct block_scratch *s)
{
    const int64_t T = a->T, D = a->D, WIN = a->sliding_window;
    const int pre = prefill(a) != 0, k = kind(a);
    a->hp = (struct dsv4_hc_pre_args){
        .x = a->x_hc, .hc_fn = a->hc_attn_fn, .hc_scale = a->hc_attn_scale,
        .hc_base = a->hc_attn_base, .x_mixed = a->x_mixed, .post = a->post, .comb = a->comb,
        .T = T, .HC = a->HC, .D = D, .MIX = a->MIX, .K = a->HCD, .HC2 = a->HC2,
        .hc_sinkhorn_iters = a->hc_sinkhorn_iters, .rms_norm_eps = a->rms_norm_eps,
        .hc_eps = a->hc_eps};
    a->rn = (struct dsv4_rms_norm_args){
        .x = a->x_mixed, .norm_w = a->attn_norm_w, .x_normed = a->x_normed, .T = T, .D = D,
        .rms_norm_eps = a->rms_norm_eps};
    a->qk = (struct dsv4_qkv_proj_rope_args){
        .x = a->x_normed, .wq_a = a->wq_a, .wq_b = a->wq_b, .wq_b_scale = a->wq_b_scale,
        .wkv = a->wkv, .rope_cos = s->cos, .rope_sin = s->sin, .gamma_cq = a->gamma_cq,
        .gamma_ckv = a->gamma_ckv, .q = a->q, .kv = a->kv, .qr = a->qr, .qr_scale = a->qr_scale,
        .T = T, .D = D, .Q = a->Q, .HHD = a->HHD, .HD = a->HD, .P = T, .RW = a->RW,
        .qk_rope_head_dim = a->qk_rope_head_dim, .rms_norm_eps = a->rms_norm_eps,
        .variant = DSV4_QKV_PLAIN};
    if (k != DSV4_BLOCK_SWA && !pre)
        a->dc = (struct dsv4_decode_compressor_args){
            .x = a->x_normed, .kv = a->compressed_kv, .compress_state = a->compress_state,
            .compress_state_block_table = a->compress_state_block_table, .wkv = a->cmp_wkv,
            .wgate = a->cmp_wgate, .ape = a->cmp_ape, .norm_w = a->cmp_norm_w, .cos = s->ccos,
            .sin = s->csin, .cmp_kv_cache = a->cmp_kv, .position_ids = a->position_ids,
            .cmp_slot_mapping = a->cmp_slot_mapping, .state_slot_mapping = a->state_slot_mapping,
            .B = a->B, .S = T / a->B, .D = D, .HD = a->HD, .OD = a->COD, .NB = a->CNB,
            .PAGE = a->CPAGE, .SW = a->CSW, .NP = a->CNP, .R = a->CR, .R2 = a->RW / 2,
            .NC = a->CB, .CBLK = a->BLOCK, .qk_rope_head_dim = a->qk_rope_head_dim,
            .rms_norm_eps = a->rms_norm_eps, .variant = k == DSV4_BLOCK_HCA ? 128 : 4};
    if (k != DSV4_BLOCK_SWA && pre)
        a->pc = (struct dsv4_prefill_compressor_args){
            .x = a->x_normed, .kv_state = a->cmp_kv_state, .score_state = a->cmp_score_state,
            .compress_state_block_table = a->compress_state_block_table, .wkv = a->cmp_wkv,
            .wgate = a->cmp_wgate, .ape = a->cmp_ape, .norm_w = a->cmp_norm_w,
            .freqs_cos = a->freqs_cos, .freqs_sin = a->freqs_sin, .cmp_kv = a->cmp_kv,
            .position_ids = a->position_ids, .cmp_slot_mapping = a->cmp_slot_mapping,
            .state_slot_mapping = a->state_slot_mapping, .T = T, .D = D, .OD = a->COD,
            .HD = a->HD, .NB = a->CNB, .PAGE = a->CPAGE, .NP = a->CNP, .R = a->CR,
            .MAXS = a->MAXS, .RW = a->RW, .NC = a->CB, .CBLK = a->BLOCK,
            .num_tokens = a->num_tokens, .qk_rope_head_dim = a->qk_rope_head_dim,
            .rms_norm_eps = a->rms_norm_eps, .variant = k == DSV4_BLOCK_HCA ? 128 : 4};
    if (k == DSV4_BLOCK_CSA) {
        struct dsv4_indexer_query q = {
            .qr = a->qr, .qr_scale = a->qr_scale, .wq_b = a->idx_wq_b,
            .wq_b_scale = a->idx_wq_b_scale, .weights_proj = a->weights_proj,
            .cos = s->icos, .sin = s->isin, .idx_block_table = a->idx_block_table,
            .score = s->score, .topk_idxs = a->topk_idxs, .kv_seq_lens = a->kv_seq_lens,
            .N = T, .QL = a->Q, .HHD = a->IHHD, .H = a->IH, .R2q = a->RW / 2, .NBT = a->NBT,
            .offset = WIN + (pre ? T : T / a->B), .index_topk = a->index_topk,
            .index_n_heads = a->index_n_heads, .index_head_dim = a->index_head_dim,
            .max_position_embeddings = a->max_position_embeddings,
            .sliding_window = WIN, .index_weights_scale = a->index_weights_scale};
        if (pre)
            a->pi = (struct dsv4_prefill_indexer_args){
                .c = {.x = a->x_normed, .kv_state = a->inner_kv_state,
                      .score_state = a->inner_score_state,
                      .compress_state_block_table = a->inner_compress_state_block_table,
                      .wkv = a->inner_wkv, .wgate = a->inner_wgate, .ape = a->inner_ape,
                      .norm_w = a->inner_norm_w, .freqs_cos = a->freqs_cos,
                      .freqs_sin = a->freqs_sin, .cmp_kv = a->idx_kv_cache,
                      .position_ids = a->position_ids, .cmp_slot_mapping = a->idx_slot_mapping,
                      .state_slot_mapping = a->inner_state_slot_mapping,
                      .hadamard = a->hadamard_idx, .T = T, .D = D, .OD = a->IOD, .HD = a->IHD,
                      .NB = a->INB, .PAGE = a->IPAGE, .NP = a->INP, .R = a->IR, .MAXS = a->MAXS,
                      .RW = a->RW, .NC = a->NI, .CBLK = a->BLOCK, .num_tokens = a->num_tokens,
                      .qk_rope_head_dim = a->qk_rope_head_dim, .rms_norm_eps = a->rms_norm_eps},
                .q = q};
        else
            a->di = (struct dsv4_decode_indexer_args){
                .c = {.x = a->x_normed, .kv = s->inner_kv,
                      .compress_state = a->inner_compress_state,
                      .compress_state_block_table = a->inner_compress_state_block_table,
                      .wkv = a->inner_wkv, .wgate = a->inner_wgate, .ape = a->inner_ape,
                      .norm_w = a->inner_norm_w, .cos = s->icos, .sin = s->isin,
                      .cmp_kv_cache = a->idx_kv_cache, .position_ids = a->position_ids,
                      .cmp_slot_mapping = a->idx_slot_mapping,
                      .state_slot_mapping = a->inner_state_slot_mapping,
                      .hadamard = a->hadamard_idx, .B = a->B, .S = T / a->B, .D = D,
                      .HD = a->IHD, .OD = a->IOD, .NB = a->INB, .PAGE = a->IPAGE, .SW = a->ISW,
                      .NP = a->INP, .R = a->IR, .R2 = a->RW / 2, .NC = a->NI, .CBLK = a->BLOCK,
                      .qk_rope_head_dim = a->qk_rope_head_dim, .rms_norm_eps = a->rms_norm_eps},
                .q = q};
    }
    /* the index rows are the block's own except in prefill SWA and HCA */
    const int given = pre && k != DSV4_BLOCK_CSA;
    a->sa = (struct dsv4_sparse_attn_args){
        .q = a->q, .ori_kv = a->kv_cache, .ori_block_table = a->ori_block_table,
        .kv_overlay = a->kv, .cmp_kv = a->cmp_kv, .cmp_block_table = a->cmp_block_table,
        .cmp_sparse_indices = given ? a->cmp_sparse_indices : a->sparse_indices,
        .cmp_sparse_lens = given ? a->cmp_sparse_lens : a->sparse_lens,
        .attn_sink = a->attn_sink, .freqs_cos = s->cos, .freqs_sin = s->sin, .wo_a = a->wo_a,
        .wo_b = a->wo_b, .wo_b_scale = a->wo_b_scale, .attn_out = a->attn_out,
        .T = T, .H = a->H, .HD = a->HD, .OB = a->OB, .BLOCK = a->BLOCK, .OM = a->OM,
        .B = pre ? 1 : a->B, .CB = a->CB, .CM = a->CM, .K = a->K, .RW = a->RW, .G = a->G,
        .OL = a->OL, .OGI = a->OGI, .D = D, .GOL = a->GOL, .num_tokens = a->num_tokens,
        .sliding_window = WIN, .index_topk = a->index_topk,
        .qk_rope_head_dim = a->qk_rope_head_dim, .trusted = !given,
        .variant = pre ? DSV4_ATTN_PREFILL : k == DSV4_BLOCK_SWA ? DSV4_ATTN_SWA : DSV4_ATTN_DECODE};
    if (k == DSV4_BLOCK_SWA && pre) {                /* no compressed cache: a zero page */
        a->sa.cmp_kv = s->zero_page;
        a->sa.cmp_block_table = zero_table;
        a->sa.CB = 1;
        a->sa.CM = ZERO_TABLE;
    }
    a->ho = (struct dsv4_hc_post_args){
        .x = a->attn_out, .residual = a->x_hc, .post = a->post, .comb = a->comb, .y = a->x_out,
        .T = T, .HC = a->HC, .D = D, .HC2 = a->HC2};
}

/* ---- checks ---------------------------------------------------------------------- */

/* entries j < pages of a block-table row (two_d: row b of [rows, width]) must address
 * [0, pool) */
static int check_pages(const int32_t *table, int64_t b, int two_d, int64_t width, int64_t pages,
                       int64_t pool, const char *tname, const char *pname, const char *why,
                       struct dsv4_err *e)
{
    if (pages > width) {
        snprintf(e->msg, sizeof e->msg, "%s needs %lld pages of %s%s, which has %lld columns",
                 why, (long long)pages, tname, two_d ? " rows" : "", (long long)width);
        return DSV4_EVALUE;
    }
    for (int64_t j = 0; j < pages; j++) {
        int64_t v = table[(two_d ? b : 0) * width + j];
        if (v < 0 || v >= pool) {
            if (two_d)
                snprintf(e->msg, sizeof e->msg, "%s[%lld, %lld] = %lld is outside [0, %lld) (pages "
                         "of %s), read by %s", tname, (long long)b, (long long)j, (long long)v,
                         (long long)pool, pname, why);
            else
                snprintf(e->msg, sizeof e->msg, "%s[%lld] = %lld is outside [0, %lld) (pages of "
                         "%s), read by %s", tname, (long long)j, (long long)v, (long long)pool,
                         pname, why);
            return DSV4_EVALUE;
        }
    }
    return DSV4_OK;
}

static int check_block(const struct dsv4_attention_block_args *a, struct dsv4_err *e)
{
    const int64_t T = a->T, WIN = a->sliding_window, BLOCK = a->BLOCK;
    const int pre = prefill(a) != 0, k = kind(a);
    const int ring = !pre || k == DSV4_BLOCK_CSA;     /* the block builds the index rows */
    if (!pre && (T % a->B || (k != DSV4_BLOCK_SWA && T != a->B))) {
        snprintf(e->msg, sizeof e->msg,
                 "x_hc has T = %lld tokens for the B = %lld requests of ori_block_table; %s",
                 (long long)T, (long long)a->B,
                 k == DSV4_BLOCK_SWA ? "T must be a multiple of B"
                                     : "the decode compressors take one token per request");
        return DSV4_EVALUE;
    }
    if (a->HHD != a->H * a->HD) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'wq_b' has %lld columns and 'attn_sink' %lld heads; expected heads * "
                 "head_dim = %lld columns (head_dim %lld from 'wkv')",
                 (long long)a->HHD, (long long)a->H, (long long)(a->H * a->HD), (long long)a->HD);
        return DSV4_EVALUE;
    }
    if (a->RW != a->qk_rope_head_dim) {
        snprintf(e->msg, sizeof e->msg, "freqs_cos has %lld columns; expected qk_rope_head_dim = %lld",
                 (long long)a->RW, (long long)a->qk_rope_head_dim);
        return DSV4_EVALUE;
    }
    for (int64_t t = 0; t < T; t++)
        if (a->position_ids[t] < 0 || a->position_ids[t] >= a->MAXS) {
            snprintf(e->msg, sizeof e->msg, "position_ids[%lld] = %d is outside the RoPE tables "
                     "freqs_cos/freqs_sin of %lld rows", (long long)t, a->position_ids[t],
                     (long long)a->MAXS);
            return DSV4_EVALUE;
        }
    for (int64_t t = 0; t < a->num_tokens; t++)
        if (a->ori_slot_mapping[t] >= a->OB * BLOCK) {
            snprintf(e->msg, sizeof e->msg, "ori_slot_mapping[%lld] = %lld is outside [0, %lld) "
                     "(rows of kv_cache)", (long long)t, (long long)a->ori_slot_mapping[t],
                     (long long)(a->OB * BLOCK));
            return DSV4_EVALUE;
        }
    if (!pre && k != DSV4_BLOCK_SWA)
        for (int64_t b = 0; b < a->B; b++)
            if (a->kv_seq_lens[b] < 0) {
                snprintf(e->msg, sizeof e->msg, "kv_seq_lens[%lld] = %d is negative", (long long)b,
                         a->kv_seq_lens[b]);
                return DSV4_EVALUE;
            }
    /* the window ring pages of every request whose index rows the block builds */
    if (ring)
        for (int64_t b = 0; b < (pre ? 1 : a->B); b++)
            if (check_pages(a->ori_block_table, b, !pre, a->OM, (WIN + BLOCK - 1) / BLOCK, a->OB,
                            "ori_block_table", "kv_cache", "the window", e))
                return DSV4_EVALUE;
    /* the compressed pages a token may read */
    if (k != DSV4_BLOCK_SWA && !(pre && k == DSV4_BLOCK_HCA))
        for (int64_t t = 0; t < a->num_tokens; t++) {
            int64_t v = visible(a, t), pages = (v + BLOCK - 1) / BLOCK;
            if (pre && pages > a->CM)
                pages = a->CM;                    /* prefill skips slots beyond the table */
            char why[64];
            snprintf(why, sizeof why, "token %lld's %lld visible compressed rows", (long long)t,
                     (long long)v);
            if (check_pages(a->cmp_block_table, pre ? 0 : t / (T / a->B), !pre, a->CM, pages,
                            a->CB, "cmp_block_table", "cmp_kv", why, e))
                return DSV4_EVALUE;
        }
    return DSV4_OK;
}

/* Set the leaves up and run their prepare(): their checks, derived fields and scratch
 * sizes (the largest in *most). Run again by the kernel with the real buffers. */
static int prepare_leaves(struct dsv4_attention_block_args *a, const struct block_scratch *s,
                          struct dsv4_err *e, size_t *most)
{
    const int pre = prefill(a) != 0, k = kind(a), cmp = k != DSV4_BLOCK_SWA, csa = k == DSV4_BLOCK_CSA;
    setup_leaves(a, s);
    /* the leaves this kind runs, in order: name, prepare, arguments */
    const struct {
        int on;
        const char *name;
        int (*prepare)(void *, struct dsv4_err *, size_t *);
        void *args;
    } leaves[] = {
        {1, "hc_pre", dsv4_hc_pre_prepare, &a->hp},
        {1, "rms_norm", dsv4_rms_norm_prepare, &a->rn},
        {1, "qkv_proj_rope", dsv4_qkv_proj_rope_prepare, &a->qk},
        {cmp && !pre, "compressor", dsv4_decode_compressor_prepare, &a->dc},
        {cmp && pre, "compressor", dsv4_prefill_compressor_prepare, &a->pc},
        {csa && !pre, "indexer", dsv4_decode_indexer_prepare, &a->di},
        {csa && pre, "indexer", dsv4_prefill_indexer_prepare, &a->pi},
        {1, "sparse attention", dsv4_sparse_attn_prepare, &a->sa},
        {1, "hc_post", dsv4_hc_post_prepare, &a->ho},
    };
    *most = 0;
    for (size_t i = 0; i < sizeof leaves / sizeof leaves[0]; i++) {
        struct dsv4_err in = {{0}};
        size_t n = 0;
        if (!leaves[i].on)
            continue;
        if (leaves[i].prepare(leaves[i].args, &in, &n))
            return dsv4_err_prefixed(e, leaves[i].name, &in);
        *most = n > *most ? n : *most;
    }
    void *leaf = s->leaf;
    a->hp.scratch = a->rn.scratch = a->qk.scratch = a->dc.scratch = a->pc.scratch = leaf;
    a->di.scratch = a->pi.scratch = a->sa.scratch = a->ho.scratch = leaf;
    return DSV4_OK;
}

int dsv4_attention_block_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_attention_block_args *a = p;
    const int pre = prefill(a) != 0, k = kind(a);
    if (!pre)
        a->num_tokens = a->T;
    else if (dsv4_resolve_num_tokens(&a->num_tokens, a->T, e))
        return DSV4_EVALUE;
    a->HC2 = a->HC * a->HC;
    a->ISL = pre ? 2 * a->BLOCK : a->max_position_embeddings / 4;
    if (!pre)
        a->K = k == DSV4_BLOCK_SWA ? a->sliding_window
               : k == DSV4_BLOCK_HCA
                   ? (a->sliding_window + 1 + hca_limit(a) + TILE - 1) / TILE * TILE
                   : a->sliding_window + a->index_topk;
    else if (k == DSV4_BLOCK_CSA)
        a->K = a->sliding_window + a->index_topk;
    if (check_block(a, e))
        return DSV4_EVALUE;
    struct block_scratch s = {0};
    if (prepare_leaves(a, &s, e, &a->leaf_scratch))
        return DSV4_EVALUE;
    struct dsv4_arena ar = {0};
    block_layout(a, &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

/* ---- glue -------------------------------------------------------------------------- */

static void gather_rope(const struct dsv4_ops *ops, const struct dsv4_attention_block_args *a,
                        const struct block_scratch *s)
{
    const int64_t RW = a->RW, R2 = RW / 2;
    for (int64_t t = 0; t < a->T; t++) {
        memcpy(s->cos + t * RW, a->freqs_cos + a->position_ids[t] * RW, (size_t)RW * sizeof(bf16_t));
        memcpy(s->sin + t * RW, a->freqs_sin + a->position_ids[t] * RW, (size_t)RW * sizeof(bf16_t));
    }
    if (s->ccos)                        /* decode: the compressed row's window start */
        for (int64_t b = 0; b < a->B; b++) {
            int64_t p0 = a->position_ids[b * (a->T / a->B)], r = kind(a) == DSV4_BLOCK_HCA ? 128 : 4;
            dsv4_bf16_row_to_f32(ops, a->freqs_cos + (p0 - p0 % r) * RW, R2, s->ccos + b * R2);
            dsv4_bf16_row_to_f32(ops, a->freqs_sin + (p0 - p0 % r) * RW, R2, s->csin + b * R2);
        }
    if (s->icos) {                      /* the indexer query: decode per request, prefill per token */
        int64_t n = prefill(a) ? a->T : a->B, step = prefill(a) ? 1 : a->T / a->B;
        for (int64_t i = 0; i < n; i++) {
            dsv4_bf16_row_to_f32(ops, s->cos + i * step * RW, R2, s->icos + i * R2);
            dsv4_bf16_row_to_f32(ops, s->sin + i * step * RW, R2, s->isin + i * R2);
        }
    }
}

/* §3.1 step 5: the window columns of decode token (b, s): ring slots of the window, oldest
 * first, a slot holding one of the request's current tokens os <= s as overlay WIN + os */
static int64_t window_columns(const struct dsv4_attention_block_args *a, int64_t t, int32_t *row)
{
    const int64_t WIN = a->sliding_window, S = a->T / a->B, b = t / S, s = t % S;
    const int64_t p = a->position_ids[t], n = p >= WIN - 1 ? WIN : p + 1;
    for (int64_t k = 0; k < n; k++) {
        int64_t v = p >= WIN - 1 ? (p % WIN + 1 + k) % WIN : k;
        row[k] = (int32_t)v;
        for (int64_t o = s; o >= 0; o--)            /* the latest current token wins */
            if (a->position_ids[b * S + o] % WIN == v) {
                row[k] = (int32_t)(WIN + o);
                break;
            }
    }
    return n;
}

static void decode_rows(const struct dsv4_attention_block_args *a)
{
    const int64_t T = a->T, K = a->K, WIN = a->sliding_window, S = T / a->B;
    for (int64_t t = 0; t < T; t++) {
        int32_t *row = a->sparse_indices + t * K;
        const int64_t b = t / S, s = t % S, p = a->position_ids[t];
        for (int64_t k = 0; k < K; k++)
            row[k] = -1;
        if (kind(a) == DSV4_BLOCK_HCA) {
            for (int64_t k = 0; k < WIN; k++) {        /* tile 0: the ring in physical order */
                int own = 0;
                for (int64_t o = 0; o <= s; o++)
                    own |= a->position_ids[b * S + o] % WIN == k;
                if (k <= p && !own)
                    row[k] = (int32_t)k;
            }
            for (int64_t o = 0; o <= s; o++)
                row[WIN + o] = (int32_t)(WIN + o);
            for (int64_t c = 0, n = visible(a, t); c < n; c++)
                row[WIN + S + c] = (int32_t)(WIN + S + c);
            continue;
        }
        window_columns(a, t, row);
        if (kind(a) == DSV4_BLOCK_CSA) {               /* visible indexer picks, -1 gaps kept */
            const int32_t *top = a->topk_idxs + t * a->ISL;
            int64_t v = (p + 1) / 4, l = a->kv_seq_lens[b] / 4;
            v = v < l ? v : l;
            for (int64_t c = 0; c < a->index_topk; c++)
                if (top[c] >= WIN + S && top[c] - (WIN + S) < v)
                    row[WIN + c] = top[c];
        }
    }
}

/* §4.3 step 8: a prefill CSA tile's rows, compacted: the window keys ascending (a key that
 * is the position of an active row t' <= t as overlay WIN + t', else its ring slot), then
 * the indexer's visible picks in its order, up to the attention's pad */
static void prefill_rows(const struct dsv4_attention_block_args *a)
{
    const int64_t T = a->T, K = a->K, WIN = a->sliding_window, pad = a->sa.PAD;
    for (int64_t t = 0; t < T; t++) {
        int32_t *row = a->sparse_indices + t * K;
        for (int64_t k = 0; k < K; k++)
            row[k] = -1;
        a->sparse_lens[t] = 0;
        if (t >= a->num_tokens)
            continue;
        const int64_t p = a->position_ids[t], lo = p - WIN + 1 > 0 ? p - WIN + 1 : 0;
        int64_t cur = 0;
        for (int64_t j = lo; j <= p; j++) {
            int64_t raw = j % WIN;
            for (int64_t u = t; u >= 0; u--)
                if (a->position_ids[u] == j) {
                    raw = WIN + u;
                    break;
                }
            row[cur++] = (int32_t)raw;
        }
        const int32_t *top = a->topk_idxs + t * a->ISL;
        for (int64_t c = 0; c < a->ISL && cur < pad; c++)
            if (top[c] >= WIN + T && top[c] - (WIN + T) < (p + 1) / 4)
                row[cur++] = top[c];
        a->sparse_lens[t] = (int32_t)cur;
    }
}

int dsv4_attention_block(void *p, struct dsv4_err *e)
{
    struct dsv4_attention_block_args *a = p;
    struct dsv4_arena ar = {a->scratch, 0};
    struct block_scratch s;
    const int pre = prefill(a) != 0, k = kind(a);
    size_t most;
    block_layout(a, &ar, &s);
    if (prepare_leaves(a, &s, e, &most))          /* now with the outputs and the scratch */
        return DSV4_EVALUE;
    if (dsv4_hc_pre(&a->hp, e) || dsv4_rms_norm(&a->rn, e))
        return DSV4_EVALUE;
    gather_rope(dsv4_call_ops(), a, &s);
    if (dsv4_qkv_proj_rope(&a->qk, e))
        return DSV4_EVALUE;
    if (k != DSV4_BLOCK_SWA && (pre ? dsv4_prefill_compressor(&a->pc, e)
                                    : dsv4_decode_compressor(&a->dc, e)))
        return DSV4_EVALUE;
    if (k == DSV4_BLOCK_CSA) {
        if (!pre)
            memset(s.inner_kv, 0, (size_t)a->B * a->IHD * sizeof(float));
        if (pre ? dsv4_prefill_indexer(&a->pi, e) : dsv4_decode_indexer(&a->di, e))
            return DSV4_EVALUE;
    }
    if (!pre)
        decode_rows(a);
    else if (k == DSV4_BLOCK_CSA)
        prefill_rows(a);
    if (s.zero_page)
        memset(s.zero_page, 0, (size_t)a->BLOCK * a->HD * sizeof(bf16_t));
    if (dsv4_sparse_attn(&a->sa, e))
        return DSV4_EVALUE;
    /* the ring write-back, after the attention read the ring (§2.5), in token order */
    for (int64_t t = 0; t < a->num_tokens; t++)
        if (a->ori_slot_mapping[t] >= 0)
            memcpy(a->kv_cache + a->ori_slot_mapping[t] * a->HD, a->kv + t * a->HD,
                   (size_t)a->HD * sizeof(bf16_t));
    return dsv4_hc_post(&a->ho, e);
}
