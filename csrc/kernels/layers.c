/* Layers (spec chapter 06 §5, §6): decode_layer and the packed, chunked prefill_layer.
 *
 * decode_layer: the attention block of the layer's kind on each of the R ranks (data
 * parallel: every rank its own requests and caches), then the MoE across the ranks.
 * prefill_layer: a packed batch of requests, each cut into tiles of TILE rows; for every
 * request in order, for every tile in order, the block on each rank over the request's
 * own slice of every cache and state (so a tile reads what the tiles before it wrote),
 * then the MoE on the tile's rows of every rank.
 *
 * Every rank's, request's and tile's block is prepared (its addresses checked) before
 * the first one runs. */
#include <stdio.h>
#include <string.h>

#include "kernels/kernels.h"

#define TILE 128                       /* prefill rows per tile (pypto-lib's T) */

static int prefill_layer(const struct dsv4_layer_args *L) { return L->variant == 1; }

/* ---- rank views --------------------------------------------------------------------- */

#define AT(p, n) ((p) ? (p) + (n) : NULL)

/* The weights of rank r: every tensor of blk is [R, ...] with rank 0 at the pointer */
static void weights_view(const struct dsv4_layer_args *L, int64_t r, struct dsv4_attention_block_args *b)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    b->hc_attn_fn = AT(a->hc_attn_fn, r * a->MIX * a->HCD);
    b->hc_attn_scale = AT(a->hc_attn_scale, r * 3);
    b->hc_attn_base = AT(a->hc_attn_base, r * a->MIX);
    b->attn_norm_w = AT(a->attn_norm_w, r * a->D);
    b->wq_a = AT(a->wq_a, r * a->D * a->Q);
    b->wq_b = AT(a->wq_b, r * a->Q * a->HHD);
    b->wq_b_scale = AT(a->wq_b_scale, r * a->HHD);
    b->wkv = AT(a->wkv, r * a->D * a->HD);
    b->gamma_cq = AT(a->gamma_cq, r * a->Q);
    b->gamma_ckv = AT(a->gamma_ckv, r * a->HD);
    b->freqs_cos = AT(a->freqs_cos, r * a->MAXS * a->RW);
    b->freqs_sin = AT(a->freqs_sin, r * a->MAXS * a->RW);
    b->attn_sink = AT(a->attn_sink, r * a->H);
    b->wo_a = AT(a->wo_a, r * a->G * a->OL * a->OGI);
    b->wo_b = AT(a->wo_b, r * a->D * a->GOL);
    b->wo_b_scale = AT(a->wo_b_scale, r * a->D);
    b->idx_wq_b = AT(a->idx_wq_b, r * a->Q * a->IHHD);
    b->idx_wq_b_scale = AT(a->idx_wq_b_scale, r * a->IHHD);
    b->weights_proj = AT(a->weights_proj, r * a->D * a->IH);
    b->hadamard_idx = AT(a->hadamard_idx, r * a->IHD * a->IHD);
    b->inner_wkv = AT(a->inner_wkv, r * a->IOD * a->D);
    b->inner_wgate = AT(a->inner_wgate, r * a->IOD * a->D);
    b->inner_ape = AT(a->inner_ape, r * a->IR * a->IOD);
    b->inner_norm_w = AT(a->inner_norm_w, r * a->IHD);
    const struct dsv4_layer_cmp *c = b->variant % 4 == DSV4_BLOCK_HCA ? &L->hca : &L->csa;
    b->cmp_wkv = AT(c->wkv, r * c->OD * a->D);
    b->cmp_wgate = AT(c->wgate, r * c->OD * a->D);
    b->cmp_ape = AT(c->ape, r * c->R * c->OD);
    b->cmp_norm_w = AT(c->norm_w, r * a->HD);
    b->COD = c->OD;
    b->CR = c->R;
    b->CNB = c->NB;
    b->CPAGE = c->PAGE;
    b->CSW = c->SW;
    b->CNP = c->NP;
}

/* decode: rank r's tokens, caches, states and tables */
static void decode_view(const struct dsv4_layer_args *L, int64_t r, struct dsv4_attention_block_args *b)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    const struct dsv4_layer_cmp *c = b->variant == DSV4_BLOCK_HCA ? &L->hca : &L->csa;
    const int64_t T = a->T, B = a->B;
    weights_view(L, r, b);
    b->x_hc = a->x_hc + r * T * a->HC * a->D;
    b->kv_cache = a->kv_cache + r * a->OB * a->BLOCK * a->HD;
    b->ori_block_table = a->ori_block_table + r * B * a->OM;
    b->ori_slot_mapping = a->ori_slot_mapping + r * T;
    b->position_ids = a->position_ids + r * T;
    b->kv_seq_lens = a->kv_seq_lens + r * B;
    b->compress_state = AT(c->state, r * c->NB * c->PAGE * c->SW);
    b->compress_state_block_table = AT(c->table, r * B * c->NP);
    b->cmp_slot_mapping = AT(c->cmp_slot_mapping, r * T);
    b->state_slot_mapping = AT(c->state_slot_mapping, r * T);
    b->cmp_kv = AT(a->cmp_kv, r * a->CB * a->BLOCK * a->HD);
    b->cmp_block_table = AT(a->cmp_block_table, r * B * a->CM);
    b->idx_kv_cache = AT(a->idx_kv_cache, r * a->NI * a->BLOCK * a->IHD);
    b->idx_block_table = AT(a->idx_block_table, r * B * a->NBT);
    b->idx_slot_mapping = AT(a->idx_slot_mapping, r * T);
    b->inner_state_slot_mapping = AT(a->inner_state_slot_mapping, r * T);
    b->inner_compress_state = AT(a->inner_compress_state, r * a->INB * a->IPAGE * a->ISW);
    b->inner_compress_state_block_table = AT(a->inner_compress_state_block_table, r * B * a->INP);
}

/* prefill: rank r, request q, the tile starting at packed row `base`: per-token rows of the
 * tile, request q's slice of every cache, state and table (each packed [R, NREQ * n, ...]) */
static void prefill_view(const struct dsv4_layer_args *L, int64_t r, int64_t q, int64_t base,
                         struct dsv4_attention_block_args *b)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    const struct dsv4_layer_cmp *c = b->variant % 4 == DSV4_BLOCK_HCA ? &L->hca : &L->csa;
    const int64_t N = L->NREQ, P = a->T, row = r * P + base;   /* a->T: packed rows */
    /* request q of rank r in a packed [R, N * n, rest...] tensor of `n * rest` per request */
#define REQ(p, per) AT(p, (r * N + q) * (per))
    weights_view(L, r, b);
    b->x_hc = a->x_hc + row * a->HC * a->D;
    b->ori_slot_mapping = a->ori_slot_mapping + row;
    b->position_ids = a->position_ids + row;
    b->cmp_sparse_indices = a->cmp_sparse_indices + row * a->K;
    b->cmp_sparse_lens = a->cmp_sparse_lens + row;
    b->cmp_slot_mapping = AT(c->cmp_slot_mapping, row);
    b->state_slot_mapping = AT(c->state_slot_mapping, row);
    b->idx_slot_mapping = AT(a->idx_slot_mapping, row);
    b->inner_state_slot_mapping = AT(a->inner_state_slot_mapping, row);
    b->kv_cache = REQ(a->kv_cache, a->OB / N * a->BLOCK * a->HD);
    b->ori_block_table = REQ(a->ori_block_table, a->OM / N);
    b->cmp_kv = REQ(a->cmp_kv, a->CB / N * a->BLOCK * a->HD);
    b->cmp_block_table = REQ(a->cmp_block_table, a->CM / N);
    b->idx_kv_cache = REQ(a->idx_kv_cache, a->NI / N * a->BLOCK * a->IHD);
    b->idx_block_table = REQ(a->idx_block_table, a->NBT / N);
    b->cmp_kv_state = REQ(c->kv_state, c->NB / N * c->PAGE * c->OD);
    b->cmp_score_state = REQ(c->score_state, c->NB / N * c->PAGE * c->OD);
    b->compress_state_block_table = REQ(c->table, c->NP / N);
    b->inner_kv_state = REQ(a->inner_kv_state, a->INB / N * a->IPAGE * a->IOD);
    b->inner_score_state = REQ(a->inner_score_state, a->INB / N * a->IPAGE * a->IOD);
    b->inner_compress_state_block_table = REQ(a->inner_compress_state_block_table, a->INP / N);
#undef REQ
    /* the per-request sizes the block sees */
    b->OB = a->OB / N;
    b->OM = a->OM / N;
    b->CB = a->CB / N;
    b->CM = a->CM / N;
    b->NI = a->NI / N;
    b->NBT = a->NBT / N;
    b->CNB = c->NB / N;
    b->CNP = c->NP / N;
    b->INB = a->INB / N;
    b->INP = a->INP / N;
    b->T = TILE;
    b->B = 1;                          /* one request */
}

/* ---- tiles -------------------------------------------------------------------------- */

struct tile { int64_t q, ctx, valid, base; };

static int64_t count_tiles(const struct dsv4_layer_args *L)
{
    int64_t n = 0;
    for (int64_t q = 0; q < L->NREQ; q++)
        n += (L->chunk_lens[q] + TILE - 1) / TILE;
    return n;
}

static struct tile tile_at(const struct dsv4_layer_args *L, int64_t i)
{
    for (int64_t q = 0; q < L->NREQ; q++) {
        int64_t n = (L->chunk_lens[q] + TILE - 1) / TILE;
        if (i < n) {
            int64_t valid = L->chunk_lens[q] - i * TILE;
            return (struct tile){q, L->seq_lens[q] - L->chunk_lens[q] + i * TILE,
                                 valid < TILE ? valid : TILE, L->chunk_offsets[q] + i * TILE};
        }
        i -= n;
    }
    return (struct tile){0, 0, 0, 0};
}

/* ---- scratch ------------------------------------------------------------------------ */

struct layer_scratch {
    void *stage;                       /* the block's stage tensors, one rank at a time */
    bf16_t *x_attn, *x_next;           /* prefill: one tile of every rank */
    int64_t *ids;                      /* prefill: [R, TILE] the tile's token ids */
    char *undo;                        /* the rows the blocks may write, as they were */
    void *work;                        /* the block's or the MoE's */
};

static size_t stage_bytes(const struct dsv4_attention_block_args *b)
{
    const int64_t T = b->T, HC = b->HC, D = b->D;
    return (size_t)T * (3 * D * sizeof(bf16_t) + (HC + HC * HC + 1) * sizeof(float) +
                        b->H * b->HD * sizeof(bf16_t) + b->HD * sizeof(bf16_t) + b->Q +
                        (b->K + 1 + b->ISL) * sizeof(int32_t)) +
           (size_t)b->B * (b->HD + b->ISL) * sizeof(float) + 64 * 16;
}

size_t dsv4_attention_block_stages(struct dsv4_attention_block_args *b, void *p)
{
    const int64_t T = b->T, D = b->D;
    struct dsv4_arena ar = {p, 0};
    b->x_mixed = dsv4_take(&ar, (size_t)T * D * sizeof(bf16_t));
    b->x_normed = dsv4_take(&ar, (size_t)T * D * sizeof(bf16_t));
    b->attn_out = dsv4_take(&ar, (size_t)T * D * sizeof(bf16_t));
    b->post = dsv4_take(&ar, (size_t)T * b->HC * sizeof(float));
    b->comb = dsv4_take(&ar, (size_t)T * b->HC * b->HC * sizeof(float));
    b->qr_scale = dsv4_take(&ar, (size_t)T * sizeof(float));
    b->q = dsv4_take(&ar, (size_t)T * b->H * b->HD * sizeof(bf16_t));
    b->kv = dsv4_take(&ar, (size_t)T * b->HD * sizeof(bf16_t));
    b->qr = dsv4_take(&ar, (size_t)T * b->Q);
    b->sparse_indices = dsv4_take(&ar, (size_t)T * b->K * sizeof(int32_t));
    b->sparse_lens = dsv4_take(&ar, (size_t)T * sizeof(int32_t));
    b->topk_idxs = dsv4_take(&ar, (size_t)T * b->ISL * sizeof(int32_t));
    b->compressed_kv = dsv4_take(&ar, (size_t)b->B * b->HD * sizeof(float));
    return ar.used;
}

/* a block's stage tensors in the layer's stage buffer (sized by prepare() from the same
 * blocks: a mismatch is a bug, reported rather than written past) */
static int place_stages(const struct dsv4_layer_args *L, struct dsv4_attention_block_args *b,
                        void *p, struct dsv4_err *e)
{
    if (dsv4_attention_block_stages(b, p) > L->stage_size) {
        snprintf(e->msg, sizeof e->msg, "internal: a block's stages outgrow the layer's buffer");
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

/* The block's per-token stages written straight into the layer's [R, T, ...] ones, at
 * rank r's rows from `row` on (prefill: the tile's base) */
static void point_stages(const struct dsv4_layer_args *L, int64_t r, int64_t row,
                         struct dsv4_attention_block_args *b)
{
    const int64_t i = r * L->blk.T + row, HC = b->HC;
    b->x_mixed = L->st.x_mixed + i * b->D;
    b->x_normed = L->st.x_normed + i * b->D;
    b->attn_out = L->st.attn_out + i * b->D;
    b->post = L->st.post + i * HC;
    b->comb = L->st.comb + i * HC * HC;
    b->qr_scale = L->st.qr_scale + i;
    b->q = L->st.q + i * b->H * b->HD;
    b->kv = L->st.kv + i * b->HD;
    b->qr = L->st.qr + i * b->Q;
}

/* zero rows [from, to) of rank r's per-token stages (prefill: the rows past a tile's
 * valid ones, which the block may compute but which belong to no token) */
static void clear_stage_rows(const struct dsv4_layer_args *L, int64_t r, int64_t from, int64_t to)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    const int64_t i = r * a->T + from, n = to - from;
    if (n <= 0)
        return;
    memset(L->st.x_mixed + i * a->D, 0, (size_t)n * a->D * sizeof(bf16_t));
    memset(L->st.x_normed + i * a->D, 0, (size_t)n * a->D * sizeof(bf16_t));
    memset(L->st.attn_out + i * a->D, 0, (size_t)n * a->D * sizeof(bf16_t));
    memset(L->st.post + i * a->HC, 0, (size_t)n * a->HC * sizeof(float));
    memset(L->st.comb + i * a->HC * a->HC, 0, (size_t)n * a->HC * a->HC * sizeof(float));
    memset(L->st.qr_scale + i, 0, (size_t)n * sizeof(float));
    memset(L->st.q + i * a->H * a->HD, 0, (size_t)n * a->H * a->HD * sizeof(bf16_t));
    memset(L->st.kv + i * a->HD, 0, (size_t)n * a->HD * sizeof(bf16_t));
    memset(L->st.qr + i * a->Q, 0, (size_t)n * a->Q);
}

/* The block of rank r (and, in prefill, tile t): its view of the layer's tensors */
static void block_view(const struct dsv4_layer_args *L, int64_t r, const struct tile *t,
                       struct dsv4_attention_block_args *b)
{
    *b = L->blk;
    b->variant = (L->compress_ratio == 128 ? DSV4_BLOCK_HCA : L->compress_ratio == 4
                  ? DSV4_BLOCK_CSA : DSV4_BLOCK_SWA) | (prefill_layer(L) ? DSV4_BLOCK_PREFILL : 0);
    if (prefill_layer(L)) {
        prefill_view(L, r, t->q, t->base, b);
        b->num_tokens = t->valid;
    } else {
        decode_view(L, r, b);
        b->num_tokens = b->T;
    }
}

/* ... and prepared: its checks have run. */
static int block_of(const struct dsv4_layer_args *L, int64_t r, const struct tile *t,
                    struct dsv4_attention_block_args *b, struct dsv4_err *e, size_t *scratch)
{
    block_view(L, r, t, b);
    struct dsv4_err in = {{0}};
    if (dsv4_attention_block_prepare(b, &in, scratch)) {
        char where[96];
        if (prefill_layer(L))
            snprintf(where, sizeof where, "rank %lld, request %lld, tile at row %lld", (long long)r,
                     (long long)t->q, (long long)t->base);
        else
            snprintf(where, sizeof where, "rank %lld", (long long)r);
        return dsv4_err_prefixed(e, where, &in);
    }
    return DSV4_OK;
}

/* ---- undo: the MoE's routing can overflow a receive buffer, which only the data reveal,
 * after the blocks wrote their caches and states. Every row a block may write is named by
 * a slot mapping entry; the rows are saved before the first block runs and put back if
 * the layer fails. */

struct rows { char *base; size_t bytes; const int64_t *slot; };

static int block_rows(const struct dsv4_attention_block_args *b, struct rows *w)
{
    const int k = b->variant & 3, pre = b->variant & DSV4_BLOCK_PREFILL;
    int n = 0;
    w[n++] = (struct rows){(char *)b->kv_cache, (size_t)b->HD * sizeof(bf16_t), b->ori_slot_mapping};
    if (k == DSV4_BLOCK_SWA)
        return n;
    if (pre) {
        w[n++] = (struct rows){(char *)b->cmp_kv_state, (size_t)b->COD * sizeof(float), b->state_slot_mapping};
        w[n++] = (struct rows){(char *)b->cmp_score_state, (size_t)b->COD * sizeof(float), b->state_slot_mapping};
    } else {
        w[n++] = (struct rows){(char *)b->compress_state, (size_t)b->CSW * sizeof(float), b->state_slot_mapping};
    }
    w[n++] = (struct rows){(char *)b->cmp_kv, (size_t)b->HD * sizeof(bf16_t), b->cmp_slot_mapping};
    if (k != DSV4_BLOCK_CSA)
        return n;
    if (pre) {
        w[n++] = (struct rows){(char *)b->inner_kv_state, (size_t)b->IOD * sizeof(float), b->inner_state_slot_mapping};
        w[n++] = (struct rows){(char *)b->inner_score_state, (size_t)b->IOD * sizeof(float), b->inner_state_slot_mapping};
    } else {
        w[n++] = (struct rows){(char *)b->inner_compress_state, (size_t)b->ISW * sizeof(float), b->inner_state_slot_mapping};
    }
    w[n++] = (struct rows){(char *)b->idx_kv_cache, (size_t)b->IHD * sizeof(bf16_t), b->idx_slot_mapping};
    return n;
}

enum { UNDO_SIZE, UNDO_SAVE, UNDO_RESTORE };

/* Walk every row every block may write: count its bytes, save it to buf, or put it back. */
static size_t undo(const struct dsv4_layer_args *L, char *buf, int what)
{
    const int64_t ntiles = prefill_layer(L) ? count_tiles(L) : 1;
    size_t used = 0;
    struct dsv4_attention_block_args b;
    struct rows w[8];
    for (int64_t i = 0; i < ntiles; i++) {
        struct tile t = prefill_layer(L) ? tile_at(L, i) : (struct tile){0, 0, 0, 0};
        for (int64_t r = 0; r < L->R; r++) {
            block_view(L, r, &t, &b);
            int nw = block_rows(&b, w);
            for (int j = 0; j < nw; j++)
                for (int64_t u = 0; u < b.num_tokens; u++) {
                    if (w[j].slot[u] < 0)
                        continue;
                    char *row = w[j].base + w[j].slot[u] * w[j].bytes;
                    if (what == UNDO_SAVE)
                        memcpy(buf + used, row, w[j].bytes);
                    else if (what == UNDO_RESTORE)
                        memcpy(row, buf + used, w[j].bytes);
                    used += w[j].bytes;
                }
        }
    }
    return used;
}

static void moe_setup(const struct dsv4_layer_args *L, struct dsv4_moe_args *m, int64_t T)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    *m = L->moe;
    m->R = L->R;
    m->T = T;
    m->HC = a->HC;
    m->D = a->D;
    m->MIX = a->MIX;
    m->HCD = a->HCD;
    m->layer_id = L->layer_id;
    m->rms_norm_eps = a->rms_norm_eps;
    m->hc_eps = a->hc_eps;
    m->hc_sinkhorn_iters = a->hc_sinkhorn_iters;
}

static int check_layer(struct dsv4_layer_args *L, struct dsv4_err *e)
{
    if (L->layer_id < 0 || L->layer_id >= L->num_hidden_layers || L->compress_ratio < 0) {
        snprintf(e->msg, sizeof e->msg, "layer_id = %lld is outside [0, %lld) (num_hidden_layers)",
                 (long long)L->layer_id, (long long)L->num_hidden_layers);
        return DSV4_EVALUE;
    }
    if (L->compress_ratio != 0 && L->compress_ratio != 4 && L->compress_ratio != 128) {
        snprintf(e->msg, sizeof e->msg, "layer %lld has compress ratio %lld; expected 0, 4 or 128",
                 (long long)L->layer_id, (long long)L->compress_ratio);
        return DSV4_EVALUE;
    }
    if (!prefill_layer(L))
        return DSV4_OK;
    /* the packed layout: request q's rows start at chunk_offsets[q], whole tiles each */
    int64_t next = 0;
    for (int64_t q = 0; q < L->NREQ; q++) {
        int64_t len = L->chunk_lens[q], start = L->seq_lens[q] - len;
        if (len < 1 || start < 0 || L->chunk_offsets[q] != next) {
            snprintf(e->msg, sizeof e->msg,
                     "request %lld: chunk_lens = %lld, seq_lens = %lld, chunk_offsets = %lld; "
                     "expected chunk_lens >= 1, seq_lens >= chunk_lens and chunk_offsets = %lld "
                     "(the padded rows of the requests before it)",
                     (long long)q, (long long)len, (long long)L->seq_lens[q],
                     (long long)L->chunk_offsets[q], (long long)next);
            return DSV4_EVALUE;
        }
        next += (len + TILE - 1) / TILE * TILE;
    }
    if (next != L->blk.T) {
        snprintf(e->msg, sizeof e->msg,
                 "x_hc has %lld packed rows; the requests' padded chunks hold %lld",
                 (long long)L->blk.T, (long long)next);
        return DSV4_EVALUE;
    }
    const struct dsv4_attention_block_args *a = &L->blk;
    const struct dsv4_moe_args *m = &L->moe;
    if (L->layer_id < m->num_hash_layers)          /* hash routing: tid2eid[input_ids] */
        for (int64_t r = 0; r < L->R; r++)
            for (int64_t q = 0; q < L->NREQ; q++)
                for (int64_t j = 0; j < L->chunk_lens[q]; j++) {
                    int64_t row = L->chunk_offsets[q] + j, id = m->input_ids[r * a->T + row];
                    if (id < 0 || id >= m->V) {
                        snprintf(e->msg, sizeof e->msg, "input_ids[%lld, %lld] = %lld is outside "
                                 "[0, %lld) (rows of tid2eid)", (long long)r, (long long)row,
                                 (long long)id, (long long)m->V);
                        return DSV4_EVALUE;
                    }
                    for (int64_t k = 0; k < m->K; k++) {
                        int64_t x = m->tid2eid[(r * m->V + id) * m->K + k];
                        if (x < 0 || x >= m->E) {
                            snprintf(e->msg, sizeof e->msg, "tid2eid[%lld, %lld, %lld] = %lld is "
                                     "outside [0, %lld) (experts), read for input_ids[%lld, %lld]",
                                     (long long)r, (long long)id, (long long)k, (long long)x,
                                     (long long)m->E, (long long)r, (long long)row);
                            return DSV4_EVALUE;
                        }
                    }
                }
    int64_t sizes[] = {a->OB, a->OM, a->CB, a->CM, a->NI, a->NBT, L->hca.NB, L->hca.NP,
                       L->csa.NB, L->csa.NP, a->INB, a->INP};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i] % L->NREQ) {
            snprintf(e->msg, sizeof e->msg,
                     "a cache, state or table of %lld rows does not split into the %lld requests' "
                     "slices", (long long)sizes[i], (long long)L->NREQ);
            return DSV4_EVALUE;
        }
    return DSV4_OK;
}

static void layer_layout(const struct dsv4_layer_args *L, struct dsv4_arena *ar,
                         struct layer_scratch *s)
{
    s->stage = dsv4_take(ar, L->stage_size);
    s->x_attn = s->x_next = NULL;
    s->ids = NULL;
    if (prefill_layer(L)) {
        size_t rows = (size_t)L->R * TILE * L->blk.HC * L->blk.D;
        s->x_attn = dsv4_take(ar, rows * sizeof(bf16_t));
        s->x_next = dsv4_take(ar, rows * sizeof(bf16_t));
        s->ids = dsv4_take(ar, (size_t)L->R * TILE * sizeof(int64_t));
    }
    s->undo = dsv4_take(ar, L->undo_size);
    s->work = dsv4_take(ar, L->work_size);
}

int dsv4_layer_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_layer_args *L = p;
    if (check_layer(L, e))
        return DSV4_EVALUE;
    L->blk.HC2 = L->blk.HC * L->blk.HC;
    const int64_t ntiles = prefill_layer(L) ? count_tiles(L) : 1;
    size_t work = 0, stage = 0, n;
    struct dsv4_attention_block_args b;
    for (int64_t i = 0; i < ntiles; i++) {
        struct tile t = prefill_layer(L) ? tile_at(L, i) : (struct tile){0, 0, 0, 0};
        for (int64_t r = 0; r < L->R; r++) {
            if (block_of(L, r, &t, &b, e, &n))
                return DSV4_EVALUE;
            work = n > work ? n : work;
            stage = stage_bytes(&b) > stage ? stage_bytes(&b) : stage;
        }
    }
    struct dsv4_moe_args m;
    moe_setup(L, &m, prefill_layer(L) ? TILE : L->blk.T);
    if (prefill_layer(L))         /* a tile's token ids exist only at run time: checked above */
        m.layer_id = m.num_hash_layers;
    if (dsv4_moe_prepare(&m, e, &n))
        return DSV4_EVALUE;
    work = n > work ? n : work;
    L->stage_size = stage;
    L->work_size = work;
    L->undo_size = undo(L, NULL, UNDO_SIZE);
    struct dsv4_arena ar = {0};
    struct layer_scratch s;
    layer_layout(L, &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

static int run_layer(struct dsv4_layer_args *L, const struct layer_scratch *sp, struct dsv4_err *e);

int dsv4_layer(void *p, struct dsv4_err *e)
{
    struct dsv4_layer_args *L = p;
    struct dsv4_arena ar = {L->scratch, 0};
    struct layer_scratch s;
    layer_layout(L, &ar, &s);
    undo(L, s.undo, UNDO_SAVE);
    if (run_layer(L, &s, e)) {
        undo(L, s.undo, UNDO_RESTORE);          /* what the blocks before the failure wrote */
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

static int run_layer(struct dsv4_layer_args *L, const struct layer_scratch *sp, struct dsv4_err *e)
{
    const struct dsv4_attention_block_args *a = &L->blk;
    const struct layer_scratch s = *sp;
    const int64_t R = L->R, HCD = a->HC * a->D;
    const int64_t ntiles = prefill_layer(L) ? count_tiles(L) : 1;
    size_t n;
    struct dsv4_attention_block_args b;
    struct dsv4_moe_args m;

    if (!prefill_layer(L)) {
        for (int64_t r = 0; r < R; r++) {
            if (block_of(L, r, NULL, &b, e, &n))
                return DSV4_EVALUE;
            if (place_stages(L, &b, s.stage, e))
                return DSV4_EVALUE;
            point_stages(L, r, 0, &b);
            b.x_out = L->x_attn + r * a->T * HCD;
            b.scratch = s.work;
            if (dsv4_attention_block(&b, e))
                return DSV4_EVALUE;
        }
        moe_setup(L, &m, a->T);
        m.x_hc = L->x_attn;
        m.x_next = L->moe.x_next;
        m.num_tokens = a->T;
        if (dsv4_moe_prepare(&m, e, &n))
            return DSV4_EVALUE;
        m.scratch = s.work;
        return dsv4_moe(&m, e);
    }

    memset(L->moe.x_next, 0, (size_t)R * a->T * HCD * sizeof(bf16_t));
    for (int64_t r = 0; r < R; r++)
        clear_stage_rows(L, r, 0, a->T);
    for (int64_t i = 0; i < ntiles; i++) {
        struct tile t = tile_at(L, i);
        for (int64_t r = 0; r < R; r++) {
            if (block_of(L, r, &t, &b, e, &n))
                return DSV4_EVALUE;
            if (place_stages(L, &b, s.stage, e))
                return DSV4_EVALUE;
            point_stages(L, r, t.base, &b);
            b.x_out = s.x_attn + r * TILE * HCD;
            b.scratch = s.work;
            if (dsv4_attention_block(&b, e))
                return DSV4_EVALUE;
            clear_stage_rows(L, r, t.base + t.valid, t.base + TILE);
            memcpy(L->x_attn + (r * a->T + t.base) * HCD, b.x_out,
                   (size_t)TILE * HCD * sizeof(bf16_t));
            /* the tile's token ids; rows past `valid` are 0, as the padding rows' ids */
            for (int64_t j = 0; j < TILE; j++)
                s.ids[r * TILE + j] = j < t.valid ? L->moe.input_ids[r * a->T + t.base + j] : 0;
        }
        moe_setup(L, &m, TILE);
        m.x_hc = s.x_attn;
        m.x_next = s.x_next;
        m.input_ids = s.ids;
        m.num_tokens = t.valid;
        if (dsv4_moe_prepare(&m, e, &n))
            return DSV4_EVALUE;
        m.scratch = s.work;
        if (dsv4_moe(&m, e))
            return DSV4_EVALUE;
        for (int64_t r = 0; r < R; r++)
            memcpy(L->moe.x_next + (r * a->T + t.base) * HCD, s.x_next + r * TILE * HCD,
                   (size_t)t.valid * HCD * sizeof(bf16_t));
    }
    return DSV4_OK;
}
