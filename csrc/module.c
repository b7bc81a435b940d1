/* dsv4._C: the only file that touches the CPython and NumPy C-APIs.
 *
 * One table row per kernel names its tensors (symbolic dims, role), its
 * scalars and its dims, each by its field in the kernel's argument struct,
 * whose type gives the dtype. call_kernel() is the whole binding: it validates every
 * argument against the row, binds the symbolic dims, runs the kernel's
 * prepare() (relations, index ranges, scratch size), allocates the outputs,
 * releases the GIL and runs the kernel. Nothing is written before every check
 * has passed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <stdlib.h>

#include "kernels/kernels.h"

/* UNUSED: accepted for pypto-lib's dicts, checked, not read.
 * INOUT: a state or cache updated in place (pypto-lib's InOut tensors) and returned.
 * STAGE: an intermediate the kernel always writes; an output the Python face returns
 * under "stages" when asked (stages=True), to find the stage where a result departs. */
enum role { IN, OUT, UNUSED, INOUT, STAGE };
enum { OPTIONAL = 1, FLAT = 2 };     /* FLAT: any shape holding prod(dims) elements */
enum { SC_INT, SC_FLOAT };
enum { FROM_CONFIG = 1, PER_LAYER = 2 };   /* PER_LAYER: the config's <name>s[layer_id] */
enum { ALL_ROWS = 2 };             /* has_default: None, the kernel uses every row */

struct arg_spec { const char *name; int dtype; const char *dims; int role; int flags; size_t off; };
struct scalar_spec { const char *name; int type; size_t off; int from_config; int has_default; double dflt; };
struct dim_spec { const char *name; size_t off; };

struct kernel_spec {
    const char *name;
    const char *doc;
    int internal;                   /* numerics primitive: dsv4._C only */
    int variant;                    /* copied into the struct's `variant` */
    size_t size, variant_off, scratch_off;
    const struct arg_spec *args;
    const struct scalar_spec *scalars;
    const struct dim_spec *dims;
    int (*prepare)(void *, struct dsv4_err *, size_t *);
    int (*run)(void *, struct dsv4_err *);
};

/* ---- the kernel table ----------------------------------------------------- */

/* Each row names a field of the kernel's argument struct S, the one declaration of the
 * argument's type: a tensor's dtype is its field's pointee type (ARG_DT gives it for a
 * void * field, whose dtype the variant picks), a scalar is int or float as its field is.
 * An input's field is a const pointer, an output's or a state's is not, a dim's is an
 * int64_t: a row that disagrees with its field does not compile. _AS rows bind a field
 * under another name, _IN rows a field of a member struct under the field's name. */
#define CHECK(cond, msg) (0 * sizeof(struct { _Static_assert(cond, msg); char c; }))
#define FIELD(S, f) (((S *)0)->f)
#define IS_TYPE(x, T) _Generic((x), T: 1, default: 0)
#define PTR_DTYPE(p)                                                                     \
    _Generic((p), const bf16_t *: DSV4_BF16, bf16_t *: DSV4_BF16,                        \
             const float *: DSV4_F32, float *: DSV4_F32,                                 \
             const int8_t *: DSV4_I8, int8_t *: DSV4_I8,                                 \
             const int32_t *: DSV4_I32, int32_t *: DSV4_I32,                             \
             const int64_t *: DSV4_I64, int64_t *: DSV4_I64,                             \
             const void *: -1, void *: -1)
#define PTR_CONST(p)                                                                     \
    _Generic((p), const bf16_t *: 1, const float *: 1, const int8_t *: 1,                \
             const int32_t *: 1, const int64_t *: 1, const void *: 1, default: 0)
#define ARG_OFF(S, name, f, role)                                                        \
    (offsetof(S, f) +                                                                    \
     CHECK((role == IN) == PTR_CONST(FIELD(S, f)),                                       \
           "argument " name ": an input needs a const pointer field, an output or a "    \
           "state a non-const one"))
#define ARG_FLAGS(S, name, f, dims, role, flags)                                         \
    {name, PTR_DTYPE(FIELD(S, f)), dims, role, flags,                                    \
     ARG_OFF(S, name, f, role) +                                                         \
         CHECK(PTR_DTYPE(FIELD(S, f)) >= 0, "argument " name ": a void * field: use ARG_DT")}
#define ARG(S, f, dims, role) ARG_FLAGS(S, #f, f, dims, role, 0)
#define ARG_AS(S, name, f, dims, role) ARG_FLAGS(S, name, f, dims, role, 0)
#define ARG_IN(S, m, f, dims, role) ARG_FLAGS(S, #f, m.f, dims, role, 0)
#define ARG_DT(S, f, dtype, dims, role)                                                  \
    {#f, dtype, dims, role, 0,                                                           \
     ARG_OFF(S, #f, f, role) +                                                           \
         CHECK(PTR_DTYPE(FIELD(S, f)) < 0, "argument " #f ": a typed field: use ARG")}
#define SCALAR_AS(S, name, f, from_config, has_default, dflt)                            \
    {name, _Generic(FIELD(S, f), int64_t: SC_INT, float: SC_FLOAT), offsetof(S, f),      \
     from_config, has_default, dflt}
#define SCALAR(S, f, from_config, has_default, dflt)                                     \
    SCALAR_AS(S, #f, f, from_config, has_default, dflt)
#define SCALAR_IN(S, m, f, from_config, has_default, dflt)                               \
    SCALAR_AS(S, #f, m.f, from_config, has_default, dflt)
#define DIM_AS(S, name, f)                                                               \
    {name, offsetof(S, f) + CHECK(IS_TYPE(FIELD(S, f), int64_t),                         \
                                  "dim " name ": its field must be an int64_t")}
#define DIM(S, f) DIM_AS(S, #f, f)
#define DIM_IN(S, m, f) DIM_AS(S, #f, m.f)

#define RMS struct dsv4_rms_norm_args
static const struct dim_spec rms_dims[] = {DIM(RMS, T), DIM(RMS, D), {0}};
static const struct arg_spec rms_args[] = {
    ARG(RMS, x, "T,D", IN),
    ARG(RMS, norm_w, "D", IN),
    ARG(RMS, x_normed, "T,D", OUT),
    {0}};
static const struct scalar_spec rms_scalars[] = {SCALAR(RMS, rms_norm_eps, 1, 0, 0.0), {0}};

#define QKV struct dsv4_qkv_proj_rope_args
static const struct dim_spec qkv_dims[] = {
    DIM(QKV, B), DIM(QKV, S), DIM(QKV, T), DIM(QKV, D), DIM(QKV, Q), DIM(QKV, HHD),
    DIM(QKV, HD), DIM(QKV, H), DIM(QKV, P), DIM(QKV, RW), {0}};
#define QKV_WEIGHTS                                                                  \
    ARG(QKV, wq_a, "D,Q", IN),                                                       \
    ARG(QKV, wq_b, "Q,HHD", IN),                                                     \
    ARG_FLAGS(QKV, "wq_b_scale", wq_b_scale, "HHD", IN, FLAT),                       \
    ARG(QKV, wkv, "D,HD", IN)
#define QKV_TAIL                                                                     \
    ARG(QKV, gamma_cq, "Q", IN),                                                     \
    ARG(QKV, gamma_ckv, "HD", IN),                                                   \
    ARG(QKV, q, "T,H,HD", OUT),                                                      \
    ARG(QKV, kv, "T,HD", OUT),                                                       \
    ARG(QKV, qr, "T,Q", OUT),                                                        \
    ARG(QKV, qr_scale, "T,1", OUT),                                                  \
    {0}
static const struct arg_spec qkv_args[] = {
    ARG(QKV, x, "T,D", IN),
    QKV_WEIGHTS,
    ARG(QKV, rope_cos, "T,RW", IN),
    ARG(QKV, rope_sin, "T,RW", IN),
    QKV_TAIL};
static const struct arg_spec decode_qkv_args[] = {
    ARG(QKV, x, "B,S,D", IN),
    ARG(QKV, norm_w, "D", IN),
    QKV_WEIGHTS,
    ARG(QKV, rope_cos, "T,RW", IN),
    ARG(QKV, rope_sin, "T,RW", IN),
    {"even_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    {"odd_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    QKV_TAIL};
static const struct arg_spec prefill_qkv_args[] = {
    ARG(QKV, x, "B,S,D", IN),
    ARG(QKV, norm_w, "D", IN),
    QKV_WEIGHTS,
    ARG_AS(QKV, "freqs_cos", rope_cos, "P,RW", IN),
    ARG_AS(QKV, "freqs_sin", rope_sin, "P,RW", IN),
    {"even_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    {"odd_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    QKV_TAIL};
static const struct scalar_spec qkv_scalars[] = {
    SCALAR(QKV, rms_norm_eps, 1, 0, 0.0),
    SCALAR(QKV, qk_rope_head_dim, 1, 0, 0.0),
    {0}};
static const struct scalar_spec prefill_qkv_scalars[] = {
    SCALAR(QKV, start_pos, 0, 1, 0.0),
    SCALAR(QKV, rms_norm_eps, 1, 0, 0.0),
    SCALAR(QKV, qk_rope_head_dim, 1, 0, 0.0),
    {0}};

#define HCP struct dsv4_hc_pre_args
static const struct dim_spec hc_pre_dims[] = {
    DIM(HCP, T), DIM(HCP, HC), DIM(HCP, D), DIM(HCP, MIX), DIM(HCP, K), DIM(HCP, HC2), {0}};
static const struct arg_spec hc_pre_args[] = {
    ARG(HCP, x, "T,HC,D", IN),
    ARG(HCP, hc_fn, "MIX,K", IN),
    ARG(HCP, hc_scale, "3", IN),
    ARG(HCP, hc_base, "MIX", IN),
    ARG(HCP, x_mixed, "T,D", OUT),
    ARG(HCP, post, "T,HC", OUT),
    ARG(HCP, comb, "T,HC2", OUT),
    {0}};
static const struct scalar_spec hc_pre_scalars[] = {
    SCALAR(HCP, rms_norm_eps, 1, 0, 0.0),
    SCALAR(HCP, hc_eps, 1, 0, 0.0),
    SCALAR(HCP, hc_sinkhorn_iters, 1, 0, 0.0),
    {0}};

#define HCO struct dsv4_hc_post_args
static const struct dim_spec hc_post_dims[] = {
    DIM(HCO, T), DIM(HCO, HC), DIM(HCO, D), DIM(HCO, HC2), {0}};
static const struct arg_spec hc_post_args[] = {
    ARG(HCO, x, "T,D", IN),
    ARG(HCO, residual, "T,HC,D", IN),
    ARG(HCO, post, "T,HC", IN),
    ARG(HCO, comb, "T,HC2", IN),
    ARG(HCO, y, "T,HC,D", OUT),
    {0}};

#define HCH struct dsv4_hc_head_args
static const struct dim_spec hc_head_dims[] = {
    DIM(HCH, T), DIM(HCH, HC), DIM(HCH, D), DIM(HCH, K), {0}};
static const struct arg_spec hc_head_args[] = {
    ARG(HCH, x_hc, "T,HC,D", IN),
    ARG(HCH, hc_head_fn, "HC,K", IN),
    ARG(HCH, hc_head_scale, "1", IN),
    ARG(HCH, hc_head_base, "HC", IN),
    ARG(HCH, y, "T,D", OUT),
    {0}};
static const struct scalar_spec hc_head_scalars[] = {
    SCALAR(HCH, rms_norm_eps, 1, 0, 0.0),
    SCALAR(HCH, hc_eps, 1, 0, 0.0),
    {0}};

#define GATE struct dsv4_gate_args
static const struct dim_spec gate_dims[] = {
    DIM(GATE, T), DIM(GATE, D), DIM(GATE, E), DIM(GATE, V), DIM(GATE, K), {0}};
static const struct arg_spec gate_args[] = {
    ARG(GATE, x_mixed, "T,D", IN),
    ARG(GATE, norm_w, "D", IN),
    ARG(GATE, gate_w, "E,D", IN),
    ARG(GATE, gate_bias, "E", IN),
    ARG(GATE, tid2eid, "V,K", IN),
    ARG(GATE, input_ids, "T", IN),
    ARG(GATE, x_norm, "T,D", OUT),
    ARG(GATE, x_norm_i8, "T,D", OUT),
    ARG(GATE, x_norm_scale, "T,1", OUT),
    ARG(GATE, indices, "T,K", OUT),
    ARG(GATE, weights, "T,K", OUT),
    {0}};
static const struct scalar_spec gate_scalars[] = {
    SCALAR(GATE, layer_id, 0, 0, 0.0),
    SCALAR(GATE, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR(GATE, rms_norm_eps, 1, 0, 0.0),
    SCALAR(GATE, num_hash_layers, 1, 0, 0.0),
    SCALAR(GATE, num_experts_per_tok, 1, 0, 0.0),
    SCALAR(GATE, routed_scaling_factor, 1, 0, 0.0),
    {0}};

#define SHX struct dsv4_expert_shared_args
static const struct dim_spec shx_dims[] = {DIM(SHX, T), DIM(SHX, D), DIM_AS(SHX, "I", IE), {0}};
static const struct arg_spec shx_args[] = {
    ARG(SHX, x_local_i8, "T,D", IN),
    ARG(SHX, x_local_scale_dq, "T,1", IN),
    ARG(SHX, shared_w1, "I,D", IN),
    ARG(SHX, shared_w1_scale, "I", IN),
    ARG(SHX, shared_w3, "I,D", IN),
    ARG(SHX, shared_w3_scale, "I", IN),
    ARG(SHX, shared_w2, "D,I", IN),
    ARG(SHX, shared_w2_scale, "D", IN),
    ARG(SHX, sh, "T,D", OUT),
    {0}};
static const struct scalar_spec shx_scalars[] = {
    SCALAR(SHX, swiglu_limit, 1, 0, 0.0), {0}};

#define RTX struct dsv4_expert_routed_args
static const struct dim_spec rtx_dims[] = {
    DIM(RTX, E), DIM(RTX, M), DIM(RTX, D), DIM_AS(RTX, "I", IE), {0}};
static const struct arg_spec rtx_args[] = {
    ARG(RTX, recv_x, "E,M,D", IN),
    ARG(RTX, recv_scale_dq, "E,M", IN),
    ARG(RTX, recv_weights, "E,M", IN),
    ARG(RTX, recv_expert_count, "E,1", IN),
    ARG(RTX, routed_w1, "E,I,D", IN),
    ARG(RTX, routed_w1_scale, "E,I", IN),
    ARG(RTX, routed_w3, "E,I,D", IN),
    ARG(RTX, routed_w3_scale, "E,I", IN),
    ARG(RTX, routed_w2, "E,D,I", IN),
    ARG(RTX, routed_w2_scale, "E,D", IN),
    ARG(RTX, recv_y, "E,M,D", OUT),
    {0}};
static const struct scalar_spec rtx_scalars[] = {
    SCALAR(RTX, swiglu_limit, 1, 0, 0.0), {0}};

#define MOE struct dsv4_moe_args
static const struct dim_spec moe_dims[] = {
    DIM(MOE, R), DIM(MOE, T), DIM(MOE, HC), DIM(MOE, D), DIM(MOE, MIX), DIM(MOE, HCD),
    DIM(MOE, E), DIM(MOE, V), DIM(MOE, K), DIM(MOE, EL), DIM_AS(MOE, "I", IE), {0}};
static const struct arg_spec moe_args[] = {
    ARG(MOE, x_hc, "R,T,HC,D", IN),
    ARG(MOE, hc_ffn_fn, "R,MIX,HCD", IN),
    ARG(MOE, hc_ffn_scale, "R,3", IN),
    ARG(MOE, hc_ffn_base, "R,MIX", IN),
    ARG(MOE, norm_w, "R,D", IN),
    ARG(MOE, gate_w, "R,E,D", IN),
    ARG(MOE, gate_bias, "R,E", IN),
    ARG(MOE, tid2eid, "R,V,K", IN),
    ARG(MOE, input_ids, "R,T", IN),
    ARG(MOE, routed_w1, "R,EL,I,D", IN),
    ARG(MOE, routed_w1_scale, "R,EL,I", IN),
    ARG(MOE, routed_w3, "R,EL,I,D", IN),
    ARG(MOE, routed_w3_scale, "R,EL,I", IN),
    ARG(MOE, routed_w2, "R,EL,D,I", IN),
    ARG(MOE, routed_w2_scale, "R,EL,D", IN),
    ARG(MOE, shared_w1, "R,I,D", IN),
    ARG(MOE, shared_w1_scale, "R,I", IN),
    ARG(MOE, shared_w3, "R,I,D", IN),
    ARG(MOE, shared_w3_scale, "R,I", IN),
    ARG(MOE, shared_w2, "R,D,I", IN),
    ARG(MOE, shared_w2_scale, "R,D", IN),
    ARG(MOE, x_next, "R,T,HC,D", OUT),
    {0}};
static const struct scalar_spec moe_scalars[] = {
    SCALAR(MOE, layer_id, 0, 0, 0.0),
    SCALAR(MOE, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR(MOE, rms_norm_eps, 1, 0, 0.0),
    SCALAR(MOE, hc_eps, 1, 0, 0.0),
    SCALAR(MOE, hc_sinkhorn_iters, 1, 0, 0.0),
    SCALAR(MOE, num_hash_layers, 1, 0, 0.0),
    SCALAR(MOE, num_experts_per_tok, 1, 0, 0.0),
    SCALAR(MOE, routed_scaling_factor, 1, 0, 0.0),
    SCALAR(MOE, swiglu_limit, 1, 0, 0.0),
    {0}};

#define ATT struct dsv4_sparse_attn_args
static const struct dim_spec attn_dims[] = {
    DIM(ATT, T), DIM(ATT, H), DIM(ATT, HD), DIM(ATT, OB), DIM(ATT, BLOCK), DIM(ATT, OM),
    DIM(ATT, B), DIM(ATT, CB), DIM(ATT, CM), DIM(ATT, K), DIM(ATT, RW), DIM(ATT, G),
    DIM(ATT, OL), DIM(ATT, OGI), DIM(ATT, D), DIM(ATT, GOL), {0}};
#define ATTN_TAIL                                                                    \
    ARG(ATT, attn_sink, "H", IN),                                                    \
    ARG(ATT, freqs_cos, "T,RW", IN),                                                 \
    ARG(ATT, freqs_sin, "T,RW", IN),                                                 \
    ARG(ATT, wo_a, "G,OL,OGI", IN),                                                  \
    ARG(ATT, wo_b, "D,GOL", IN),                                                     \
    ARG(ATT, wo_b_scale, "D", IN)
static const struct arg_spec prefill_attn_args[] = {
    ARG(ATT, q, "T,H,HD", IN),
    ARG(ATT, ori_kv, "OB,BLOCK,1,HD", IN),
    ARG(ATT, ori_block_table, "OM", IN),
    ARG(ATT, kv_overlay, "T,HD", IN),
    ARG(ATT, cmp_kv, "CB,BLOCK,1,HD", IN),
    ARG(ATT, cmp_block_table, "CM", IN),
    ARG(ATT, cmp_sparse_indices, "T,K", IN),
    ARG(ATT, cmp_sparse_lens, "T", IN),
    ATTN_TAIL,
    ARG(ATT, attn_out, "T,D", OUT),
    {0}};
#define DECODE_HEAD                                                                  \
    ARG(ATT, q, "T,H,HD", IN),                                                       \
    ARG(ATT, ori_kv, "OB,BLOCK,1,HD", IN),                                           \
    ARG(ATT, ori_block_table, "B,OM", IN),                                           \
    ARG_AS(ATT, "mtp_kv_overlay", kv_overlay, "T,HD", IN)
static const struct arg_spec decode_attn_args[] = {
    DECODE_HEAD,
    ARG(ATT, cmp_kv, "CB,BLOCK,1,HD", IN),
    ARG(ATT, cmp_block_table, "B,CM", IN),
    ARG(ATT, cmp_sparse_indices, "T,K", IN),
    {"valid_block_mask", DSV4_I32, "T,_", UNUSED, OPTIONAL, 0},
    ATTN_TAIL,
    ARG(ATT, attn_out, "T,D", OUT),
    {0}};
static const struct arg_spec hca_attn_args[] = {
    DECODE_HEAD,
    ARG(ATT, cmp_kv, "CB,BLOCK,1,HD", IN),
    ARG(ATT, cmp_block_table, "B,CM", IN),
    ARG(ATT, cmp_sparse_indices, "T,K", IN),
    ATTN_TAIL,
    ARG(ATT, attn_out, "T,D", OUT),
    {0}};
static const struct arg_spec swa_attn_args[] = {
    DECODE_HEAD,
    {"cmp_kv", DSV4_BF16, "_,_,_,_", UNUSED, OPTIONAL, 0},
    {"cmp_block_table", DSV4_I32, "_,_", UNUSED, OPTIONAL, 0},
    ARG(ATT, cmp_sparse_indices, "T,K", IN),
    {"win_bias", DSV4_F32, "T,_", UNUSED, OPTIONAL, 0},
    ATTN_TAIL,
    ARG(ATT, attn_out, "T,D", OUT),
    {0}};
static const struct scalar_spec prefill_attn_scalars[] = {
    SCALAR(ATT, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR(ATT, sliding_window, 1, 0, 0.0),
    SCALAR(ATT, index_topk, 1, 0, 0.0),
    SCALAR(ATT, qk_rope_head_dim, 1, 0, 0.0),
    {0}};
static const struct scalar_spec decode_attn_scalars[] = {
    SCALAR(ATT, sliding_window, 1, 0, 0.0),
    SCALAR(ATT, qk_rope_head_dim, 1, 0, 0.0),
    {0}};

#define DCP struct dsv4_decode_compressor_args
static const struct dim_spec dcp_dims[] = {
    DIM(DCP, B), DIM(DCP, S), DIM(DCP, D), DIM(DCP, HD), DIM(DCP, OD), DIM(DCP, NB),
    DIM(DCP, PAGE), DIM(DCP, SW), DIM(DCP, NP), DIM(DCP, R), DIM(DCP, R2), DIM(DCP, NC),
    DIM(DCP, CBLK), {0}};
static const struct arg_spec dcp_args[] = {
    ARG(DCP, x, "B,S,D", IN),
    ARG(DCP, kv, "B,S,HD", OUT),
    ARG(DCP, compress_state, "NB,PAGE,SW", INOUT),
    ARG(DCP, compress_state_block_table, "B,NP", IN),
    ARG(DCP, wkv, "OD,D", IN),
    ARG(DCP, wgate, "OD,D", IN),
    ARG(DCP, ape, "R,OD", IN),
    ARG(DCP, norm_w, "HD", IN),
    ARG(DCP, cos, "B,R2", IN),
    ARG(DCP, sin, "B,R2", IN),
    ARG(DCP, cmp_kv_cache, "NC,CBLK,1,HD", INOUT),
    ARG(DCP, position_ids, "B,S", IN),
    ARG(DCP, cmp_slot_mapping, "B,S", IN),
    ARG(DCP, state_slot_mapping, "B,S", IN),
    {0}};
static const struct scalar_spec dcp_scalars[] = {
    SCALAR(DCP, rms_norm_eps, 1, 0, 0.0),
    SCALAR(DCP, qk_rope_head_dim, 1, 0, 0.0),
    {0}};

#define PCP struct dsv4_prefill_compressor_args
static const struct dim_spec pcp_dims[] = {
    DIM(PCP, T), DIM(PCP, D), DIM(PCP, OD), DIM(PCP, HD), DIM(PCP, NB), DIM(PCP, PAGE),
    DIM(PCP, NP), DIM(PCP, R), DIM(PCP, MAXS), DIM(PCP, RW), DIM(PCP, NC), DIM(PCP, CBLK), {0}};
static const struct arg_spec pcp_args[] = {
    ARG(PCP, x, "T,D", IN),
    ARG(PCP, kv_state, "NB,PAGE,OD", INOUT),
    ARG(PCP, score_state, "NB,PAGE,OD", INOUT),
    ARG(PCP, compress_state_block_table, "NP", IN),
    ARG(PCP, wkv, "OD,D", IN),
    ARG(PCP, wgate, "OD,D", IN),
    ARG(PCP, ape, "R,OD", IN),
    ARG(PCP, norm_w, "HD", IN),
    ARG(PCP, freqs_cos, "MAXS,RW", IN),
    ARG(PCP, freqs_sin, "MAXS,RW", IN),
    ARG(PCP, cmp_kv, "NC,CBLK,1,HD", INOUT),
    ARG(PCP, position_ids, "T", IN),
    ARG(PCP, cmp_slot_mapping, "T", IN),
    ARG(PCP, state_slot_mapping, "T", IN),
    {0}};
static const struct scalar_spec pcp_scalars[] = {
    SCALAR(PCP, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR(PCP, rms_norm_eps, 1, 0, 0.0),
    SCALAR(PCP, qk_rope_head_dim, 1, 0, 0.0),
    {0}};

static const struct arg_spec dic_args[] = {
    ARG(DCP, x, "B,S,D", IN),
    ARG(DCP, kv, "B,S,HD", OUT),
    ARG(DCP, compress_state, "NB,PAGE,SW", INOUT),
    ARG(DCP, compress_state_block_table, "B,NP", IN),
    ARG(DCP, wkv, "OD,D", IN),
    ARG(DCP, wgate, "OD,D", IN),
    ARG(DCP, ape, "R,OD", IN),
    ARG(DCP, norm_w, "HD", IN),
    ARG(DCP, cos, "B,R2", IN),
    ARG(DCP, sin, "B,R2", IN),
    ARG(DCP, hadamard, "HD,HD", IN),
    ARG_AS(DCP, "idx_kv_cache", cmp_kv_cache, "NC,CBLK,1,HD", INOUT),
    ARG(DCP, position_ids, "B,S", IN),
    ARG_AS(DCP, "idx_slot_mapping", cmp_slot_mapping, "B,S", IN),
    ARG_AS(DCP, "inner_state_slot_mapping", state_slot_mapping, "B,S", IN),
    {0}};
static const struct dim_spec pic_dims[] = {
    DIM(PCP, T), DIM(PCP, D), DIM(PCP, OD), DIM(PCP, HD), DIM(PCP, NB), DIM(PCP, PAGE),
    DIM(PCP, NP), DIM(PCP, R), DIM(PCP, MAXS), DIM(PCP, RW), DIM(PCP, NC), DIM(PCP, CBLK),
    DIM(PCP, W), {0}};
static const struct arg_spec pic_args[] = {
    ARG(PCP, x, "T,D", IN),
    ARG_AS(PCP, "kv", kv_out, "W,HD", OUT),
    ARG(PCP, kv_state, "NB,PAGE,OD", INOUT),
    ARG(PCP, score_state, "NB,PAGE,OD", INOUT),
    ARG_AS(PCP, "inner_compress_state_block_table", compress_state_block_table, "NP", IN),
    ARG(PCP, wkv, "OD,D", IN),
    ARG(PCP, wgate, "OD,D", IN),
    ARG(PCP, ape, "R,OD", IN),
    ARG(PCP, norm_w, "HD", IN),
    ARG(PCP, freqs_cos, "MAXS,RW", IN),
    ARG(PCP, freqs_sin, "MAXS,RW", IN),
    ARG(PCP, hadamard, "HD,HD", IN),
    ARG_AS(PCP, "idx_kv_cache", cmp_kv, "NC,CBLK,1,HD", INOUT),
    {"idx_block_table", DSV4_I32, "_", UNUSED, 0, 0},
    ARG(PCP, position_ids, "T", IN),
    ARG_AS(PCP, "idx_slot_mapping", cmp_slot_mapping, "T", IN),
    ARG_AS(PCP, "inner_state_slot_mapping", state_slot_mapping, "T", IN),
    {0}};

#define DIX struct dsv4_decode_indexer_args
static const struct dim_spec dix_dims[] = {
    DIM_IN(DIX, c, B), DIM_IN(DIX, c, S), DIM_IN(DIX, c, D), DIM_IN(DIX, c, HD),
    DIM_IN(DIX, c, OD), DIM_IN(DIX, c, NB), DIM_IN(DIX, c, PAGE), DIM_IN(DIX, c, SW),
    DIM_IN(DIX, c, NP), DIM_IN(DIX, c, R), DIM_IN(DIX, c, R2), DIM_IN(DIX, c, NC),
    DIM_IN(DIX, c, CBLK),
    DIM_IN(DIX, q, N), DIM_IN(DIX, q, QL), DIM_IN(DIX, q, HHD), DIM_IN(DIX, q, H),
    DIM_IN(DIX, q, NBT), DIM_IN(DIX, q, SL), {0}};
static const struct arg_spec dix_args[] = {
    ARG_IN(DIX, c, x, "B,S,D", IN),
    ARG_IN(DIX, q, qr, "N,QL", IN),
    ARG_IN(DIX, q, qr_scale, "N,1", IN),
    ARG_IN(DIX, q, wq_b, "QL,HHD", IN),
    ARG_IN(DIX, q, wq_b_scale, "HHD", IN),
    ARG_IN(DIX, q, weights_proj, "D,H", IN),
    ARG_IN(DIX, c, cos, "B,R2", IN),
    ARG_IN(DIX, c, sin, "B,R2", IN),
    ARG_IN(DIX, c, hadamard, "HD,HD", IN),
    ARG_AS(DIX, "inner_kv", c.kv, "B,S,HD", INOUT),
    ARG_AS(DIX, "inner_compress_state", c.compress_state, "NB,PAGE,SW", INOUT),
    ARG_AS(DIX, "inner_compress_state_block_table", c.compress_state_block_table, "B,NP", IN),
    ARG_AS(DIX, "inner_wkv", c.wkv, "OD,D", IN),
    ARG_AS(DIX, "inner_wgate", c.wgate, "OD,D", IN),
    ARG_AS(DIX, "inner_ape", c.ape, "R,OD", IN),
    ARG_AS(DIX, "inner_norm_w", c.norm_w, "HD", IN),
    ARG_AS(DIX, "idx_kv_cache", c.cmp_kv_cache, "NC,CBLK,1,HD", INOUT),
    ARG_IN(DIX, q, idx_block_table, "B,NBT", IN),
    ARG_IN(DIX, q, score, "B,S,SL", OUT),
    ARG_IN(DIX, q, topk_idxs, "B,S,SL", OUT),
    ARG_IN(DIX, c, position_ids, "B,S", IN),
    ARG_AS(DIX, "idx_slot_mapping", c.cmp_slot_mapping, "B,S", IN),
    ARG_AS(DIX, "inner_state_slot_mapping", c.state_slot_mapping, "B,S", IN),
    ARG_IN(DIX, q, kv_seq_lens, "B", IN),
    {0}};
static const struct scalar_spec dix_scalars[] = {
    SCALAR_IN(DIX, q, offset, 0, 1, 128.0),
    SCALAR_IN(DIX, c, rms_norm_eps, 1, 0, 0.0),
    SCALAR_IN(DIX, c, qk_rope_head_dim, 1, 0, 0.0),
    SCALAR_IN(DIX, q, index_topk, 1, 0, 0.0),
    SCALAR_IN(DIX, q, index_n_heads, 1, 0, 0.0),
    SCALAR_IN(DIX, q, index_head_dim, 1, 0, 0.0),
    SCALAR_IN(DIX, q, index_weights_scale, 1, 0, 0.0),
    SCALAR_IN(DIX, q, max_position_embeddings, 1, 0, 0.0),
    {0}};

#define PIX struct dsv4_prefill_indexer_args
static const struct dim_spec pix_dims[] = {
    DIM_IN(PIX, c, T), DIM_IN(PIX, c, D), DIM_IN(PIX, c, OD), DIM_IN(PIX, c, HD),
    DIM_IN(PIX, c, NB), DIM_IN(PIX, c, PAGE), DIM_IN(PIX, c, NP), DIM_IN(PIX, c, R),
    DIM_IN(PIX, c, MAXS), DIM_IN(PIX, c, RW), DIM_IN(PIX, c, NC), DIM_IN(PIX, c, CBLK),
    DIM_IN(PIX, q, N), DIM_IN(PIX, q, QL), DIM_IN(PIX, q, HHD), DIM_IN(PIX, q, H),
    DIM_AS(PIX, "R2", q.R2q), DIM_IN(PIX, q, NBT), DIM_IN(PIX, q, SL), {0}};
static const struct arg_spec pix_args[] = {
    ARG_IN(PIX, c, x, "T,D", IN),
    ARG_IN(PIX, q, qr, "N,QL", IN),
    ARG_IN(PIX, q, qr_scale, "N,1", IN),
    ARG_IN(PIX, q, wq_b, "QL,HHD", IN),
    ARG_IN(PIX, q, wq_b_scale, "HHD", IN),
    ARG_IN(PIX, q, weights_proj, "D,H", IN),
    ARG_IN(PIX, q, cos, "N,R2", IN),
    ARG_IN(PIX, q, sin, "N,R2", IN),
    ARG_IN(PIX, c, freqs_cos, "MAXS,RW", IN),
    ARG_IN(PIX, c, freqs_sin, "MAXS,RW", IN),
    ARG_IN(PIX, c, hadamard, "HD,HD", IN),
    ARG_AS(PIX, "inner_kv_state", c.kv_state, "NB,PAGE,OD", INOUT),
    ARG_AS(PIX, "inner_score_state", c.score_state, "NB,PAGE,OD", INOUT),
    ARG_AS(PIX, "inner_compress_state_block_table", c.compress_state_block_table, "NP", IN),
    ARG_AS(PIX, "inner_wkv", c.wkv, "OD,D", IN),
    ARG_AS(PIX, "inner_wgate", c.wgate, "OD,D", IN),
    ARG_AS(PIX, "inner_ape", c.ape, "R,OD", IN),
    ARG_AS(PIX, "inner_norm_w", c.norm_w, "HD", IN),
    ARG_AS(PIX, "idx_kv_cache", c.cmp_kv, "NC,CBLK,1,HD", INOUT),
    ARG_IN(PIX, q, idx_block_table, "NBT", IN),
    ARG_IN(PIX, q, score, "T,SL", OUT),
    ARG_IN(PIX, q, topk_idxs, "T,SL", OUT),
    ARG_IN(PIX, c, position_ids, "T", IN),
    ARG_AS(PIX, "idx_slot_mapping", c.cmp_slot_mapping, "T", IN),
    ARG_AS(PIX, "inner_state_slot_mapping", c.state_slot_mapping, "T", IN),
    {0}};
static const struct scalar_spec pix_scalars[] = {
    SCALAR_IN(PIX, c, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR_IN(PIX, c, rms_norm_eps, 1, 0, 0.0),
    SCALAR_IN(PIX, c, qk_rope_head_dim, 1, 0, 0.0),
    SCALAR_IN(PIX, q, index_topk, 1, 0, 0.0),
    SCALAR_IN(PIX, q, index_n_heads, 1, 0, 0.0),
    SCALAR_IN(PIX, q, index_head_dim, 1, 0, 0.0),
    SCALAR_IN(PIX, q, index_weights_scale, 1, 0, 0.0),
    SCALAR_IN(PIX, q, sliding_window, 1, 0, 0.0),
    {0}};

#define BLK struct dsv4_attention_block_args
static const struct dim_spec block_dims[] = {
    DIM(BLK, T), DIM(BLK, HC), DIM(BLK, D), DIM(BLK, MIX), DIM(BLK, HCD), DIM(BLK, HC2),
    DIM(BLK, Q), DIM(BLK, HHD), DIM(BLK, HD), DIM(BLK, H), DIM(BLK, MAXS), DIM(BLK, RW),
    DIM(BLK, COD), DIM(BLK, CR), DIM(BLK, CNB), DIM(BLK, CPAGE), DIM(BLK, CSW), DIM(BLK, CNP),
    DIM(BLK, IHHD), DIM(BLK, IH), DIM(BLK, IHD), DIM(BLK, IOD), DIM(BLK, IR), DIM(BLK, INB),
    DIM(BLK, IPAGE), DIM(BLK, ISW), DIM(BLK, INP), DIM(BLK, ISL), DIM(BLK, OB), DIM(BLK, BLOCK),
    DIM(BLK, B), DIM(BLK, OM), DIM(BLK, CB), DIM(BLK, CM), DIM(BLK, NI), DIM(BLK, NBT),
    DIM(BLK, K), DIM(BLK, G), DIM(BLK, OL), DIM(BLK, OGI), DIM(BLK, GOL), {0}};
#define BLOCK_FRONT                                                                  \
    ARG(BLK, x_hc, "T,HC,D", IN),                                                    \
    ARG(BLK, hc_attn_fn, "MIX,HCD", IN),                                             \
    ARG(BLK, hc_attn_scale, "3", IN),                                                \
    ARG(BLK, hc_attn_base, "MIX", IN),                                               \
    ARG(BLK, attn_norm_w, "D", IN),                                                  \
    ARG(BLK, wq_a, "D,Q", IN),                                                       \
    ARG(BLK, wq_b, "Q,HHD", IN),                                                     \
    ARG_FLAGS(BLK, "wq_b_scale", wq_b_scale, "HHD", IN, FLAT),                       \
    ARG(BLK, wkv, "D,HD", IN),                                                       \
    ARG(BLK, gamma_cq, "Q", IN),                                                     \
    ARG(BLK, gamma_ckv, "HD", IN),                                                   \
    ARG(BLK, freqs_cos, "MAXS,RW", IN),                                              \
    ARG(BLK, freqs_sin, "MAXS,RW", IN)
#define BLOCK_CMP_WEIGHTS                                                            \
    ARG(BLK, cmp_wkv, "COD,D", IN),                                                  \
    ARG(BLK, cmp_wgate, "COD,D", IN),                                                \
    ARG(BLK, cmp_ape, "CR,COD", IN),                                                 \
    ARG(BLK, cmp_norm_w, "HD", IN)
#define BLOCK_INNER_WEIGHTS                                                          \
    ARG(BLK, inner_wkv, "IOD,D", IN),                                                \
    ARG(BLK, inner_wgate, "IOD,D", IN),                                              \
    ARG(BLK, inner_ape, "IR,IOD", IN),                                               \
    ARG(BLK, inner_norm_w, "IHD", IN)
#define BLOCK_OPROJ                                                                  \
    ARG(BLK, attn_sink, "H", IN),                                                    \
    ARG(BLK, wo_a, "G,OL,OGI", IN),                                                  \
    ARG(BLK, wo_b, "D,GOL", IN),                                                     \
    ARG(BLK, wo_b_scale, "D", IN)
#define BLOCK_STAGES_FRONT                                                           \
    ARG(BLK, x_out, "T,HC,D", OUT),                                                  \
    ARG(BLK, x_mixed, "T,D", STAGE),                                                 \
    ARG(BLK, post, "T,HC", STAGE),                                                   \
    ARG(BLK, comb, "T,HC2", STAGE),                                                  \
    ARG(BLK, x_normed, "T,D", STAGE),                                                \
    ARG(BLK, q, "T,H,HD", STAGE),                                                    \
    ARG(BLK, kv, "T,HD", STAGE),                                                     \
    ARG(BLK, qr, "T,Q", STAGE),                                                      \
    ARG(BLK, qr_scale, "T,1", STAGE)
#define STAGE_ATTN_OUT ARG(BLK, attn_out, "T,D", STAGE)
#define STAGE_CMP_KV ARG(BLK, compressed_kv, "B,1,HD", STAGE)
#define STAGE_INDICES ARG(BLK, sparse_indices, "T,K", STAGE)

static const struct arg_spec dswa_args[] = {
    BLOCK_FRONT,
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG_AS(BLK, "block_table", ori_block_table, "B,OM", IN),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, position_ids, "T", IN),
    BLOCK_OPROJ,
    {"cmp_kv", DSV4_BF16, "_,_,_,_", UNUSED, OPTIONAL, 0},
    {"cmp_block_table", DSV4_I32, "_,_", UNUSED, OPTIONAL, 0},
    BLOCK_STAGES_FRONT, STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec dhca_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    ARG(BLK, compress_state, "CNB,CPAGE,CSW", INOUT),
    ARG(BLK, compress_state_block_table, "B,CNP", IN),
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG(BLK, ori_block_table, "B,OM", IN),
    ARG(BLK, cmp_kv, "CB,BLOCK,1,HD", INOUT),
    ARG(BLK, cmp_block_table, "B,CM", IN),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, cmp_slot_mapping, "T", IN),
    ARG(BLK, state_slot_mapping, "T", IN),
    ARG(BLK, position_ids, "T", IN),
    ARG(BLK, kv_seq_lens, "B", IN),
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_CMP_KV, STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec dcsa_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    ARG(BLK, compress_state, "CNB,CPAGE,CSW", INOUT),
    ARG(BLK, compress_state_block_table, "B,CNP", IN),
    ARG(BLK, idx_wq_b, "Q,IHHD", IN),
    ARG(BLK, idx_wq_b_scale, "IHHD", IN),
    ARG(BLK, weights_proj, "D,IH", IN),
    ARG(BLK, hadamard_idx, "IHD,IHD", IN),
    BLOCK_INNER_WEIGHTS,
    ARG(BLK, inner_compress_state, "INB,IPAGE,ISW", INOUT),
    ARG(BLK, inner_compress_state_block_table, "B,INP", IN),
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG(BLK, ori_block_table, "B,OM", IN),
    ARG(BLK, cmp_kv, "CB,BLOCK,1,HD", INOUT),
    ARG(BLK, cmp_block_table, "B,CM", IN),
    ARG(BLK, idx_kv_cache, "NI,BLOCK,1,IHD", INOUT),
    ARG(BLK, idx_block_table, "B,NBT", IN),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, cmp_slot_mapping, "T", IN),
    ARG(BLK, idx_slot_mapping, "T", IN),
    ARG(BLK, state_slot_mapping, "T", IN),
    ARG(BLK, inner_state_slot_mapping, "T", IN),
    ARG(BLK, position_ids, "T", IN),
    ARG(BLK, kv_seq_lens, "B", IN),
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_CMP_KV,
    ARG(BLK, topk_idxs, "B,1,ISL", STAGE),
    STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec pswa_args[] = {
    BLOCK_FRONT,
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG_AS(BLK, "block_table", ori_block_table, "OM", IN),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, cmp_sparse_indices, "T,K", IN),
    ARG(BLK, cmp_sparse_lens, "T", IN),
    ARG(BLK, position_ids, "T", IN),
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec phca_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    ARG(BLK, cmp_kv_state, "CNB,CPAGE,COD", INOUT),
    ARG(BLK, cmp_score_state, "CNB,CPAGE,COD", INOUT),
    ARG(BLK, compress_state_block_table, "CNP", IN),
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, ori_block_table, "OM", IN),
    ARG(BLK, cmp_kv, "CB,BLOCK,1,HD", INOUT),
    ARG(BLK, cmp_block_table, "CM", IN),
    ARG(BLK, cmp_sparse_indices, "T,K", IN),
    ARG(BLK, cmp_sparse_lens, "T", IN),
    ARG(BLK, position_ids, "T", IN),
    ARG(BLK, cmp_slot_mapping, "T", IN),
    ARG(BLK, state_slot_mapping, "T", IN),
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec pcsa_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    ARG(BLK, cmp_kv_state, "CNB,CPAGE,COD", INOUT),
    ARG(BLK, cmp_score_state, "CNB,CPAGE,COD", INOUT),
    ARG(BLK, compress_state_block_table, "CNP", IN),
    ARG(BLK, hadamard_idx, "IHD,IHD", IN),
    ARG(BLK, idx_wq_b, "Q,IHHD", IN),
    ARG(BLK, idx_wq_b_scale, "IHHD", IN),
    ARG_AS(BLK, "idx_weights_proj", weights_proj, "D,IH", IN),
    BLOCK_INNER_WEIGHTS,
    ARG(BLK, inner_kv_state, "INB,IPAGE,IOD", INOUT),
    ARG(BLK, inner_score_state, "INB,IPAGE,IOD", INOUT),
    ARG(BLK, inner_compress_state_block_table, "INP", IN),
    ARG(BLK, kv_cache, "OB,BLOCK,1,HD", INOUT),
    ARG(BLK, ori_block_table, "OM", IN),
    ARG(BLK, ori_slot_mapping, "T", IN),
    ARG(BLK, cmp_kv, "CB,BLOCK,1,HD", INOUT),
    ARG(BLK, cmp_block_table, "CM", IN),
    ARG(BLK, idx_kv_cache, "NI,BLOCK,1,IHD", INOUT),
    ARG(BLK, idx_block_table, "NBT", IN),
    ARG(BLK, position_ids, "T", IN),
    ARG(BLK, cmp_slot_mapping, "T", IN),
    ARG(BLK, idx_slot_mapping, "T", IN),
    ARG(BLK, state_slot_mapping, "T", IN),
    ARG(BLK, inner_state_slot_mapping, "T", IN),
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT,
    ARG(BLK, topk_idxs, "T,ISL", STAGE),
    STAGE_INDICES,
    ARG(BLK, sparse_lens, "T", STAGE),
    STAGE_ATTN_OUT,
    {0}};
#define BLOCK_SCALARS                                                                \
    SCALAR(BLK, sliding_window, 1, 0, 0.0),                                          \
    SCALAR(BLK, qk_rope_head_dim, 1, 0, 0.0),                                        \
    SCALAR(BLK, index_topk, 1, 0, 0.0),                                              \
    SCALAR(BLK, index_n_heads, 1, 0, 0.0),                                           \
    SCALAR(BLK, index_head_dim, 1, 0, 0.0),                                          \
    SCALAR(BLK, max_position_embeddings, 1, 0, 0.0),                                 \
    SCALAR(BLK, hc_sinkhorn_iters, 1, 0, 0.0),                                       \
    SCALAR(BLK, rms_norm_eps, 1, 0, 0.0),                                            \
    SCALAR(BLK, hc_eps, 1, 0, 0.0),                                                  \
    SCALAR(BLK, index_weights_scale, 1, 0, 0.0)
static const struct scalar_spec decode_block_scalars[] = {BLOCK_SCALARS, {0}};
static const struct scalar_spec prefill_block_scalars[] = {
    SCALAR(BLK, num_tokens, 0, ALL_ROWS, 0.0), BLOCK_SCALARS, {0}};

#define LAY struct dsv4_layer_args
static const struct dim_spec layer_dims[] = {
    DIM(LAY, R), DIM(LAY, NREQ),
    DIM_IN(LAY, blk, T), DIM_IN(LAY, blk, HC), DIM_IN(LAY, blk, D), DIM_IN(LAY, blk, MIX),
    DIM_IN(LAY, blk, HCD), DIM_IN(LAY, blk, Q), DIM_IN(LAY, blk, HHD), DIM_IN(LAY, blk, HD),
    DIM_IN(LAY, blk, H), DIM_IN(LAY, blk, MAXS), DIM_IN(LAY, blk, RW), DIM_IN(LAY, blk, IHHD),
    DIM_IN(LAY, blk, IH), DIM_IN(LAY, blk, IHD), DIM_IN(LAY, blk, IOD), DIM_IN(LAY, blk, IR),
    DIM_IN(LAY, blk, INB), DIM_IN(LAY, blk, IPAGE), DIM_IN(LAY, blk, ISW),
    DIM_IN(LAY, blk, INP), DIM_IN(LAY, blk, OB), DIM_IN(LAY, blk, BLOCK), DIM_IN(LAY, blk, B),
    DIM_IN(LAY, blk, OM), DIM_IN(LAY, blk, CB), DIM_IN(LAY, blk, CM), DIM_IN(LAY, blk, NI),
    DIM_IN(LAY, blk, NBT), DIM_IN(LAY, blk, K), DIM_IN(LAY, blk, G), DIM_IN(LAY, blk, OL),
    DIM_IN(LAY, blk, OGI), DIM_IN(LAY, blk, GOL),
    DIM_AS(LAY, "HOD", hca.OD), DIM_AS(LAY, "HR", hca.R), DIM_AS(LAY, "HNB", hca.NB),
    DIM_AS(LAY, "HPAGE", hca.PAGE), DIM_AS(LAY, "HSW", hca.SW), DIM_AS(LAY, "HNP", hca.NP),
    DIM_AS(LAY, "COD", csa.OD), DIM_AS(LAY, "CR", csa.R), DIM_AS(LAY, "CNB", csa.NB),
    DIM_AS(LAY, "CPAGE", csa.PAGE), DIM_AS(LAY, "CSW", csa.SW), DIM_AS(LAY, "CNP", csa.NP),
    DIM_IN(LAY, moe, E), DIM_IN(LAY, moe, V), DIM_AS(LAY, "TOPK", moe.K), DIM_IN(LAY, moe, EL),
    DIM_AS(LAY, "I", moe.IE),
    DIM_IN(LAY, blk, HC2), {0}};
#define LAYER_FRONT                                                                  \
    ARG_IN(LAY, blk, hc_attn_fn, "R,MIX,HCD", IN),                                   \
    ARG_IN(LAY, blk, hc_attn_scale, "R,3", IN),                                      \
    ARG_IN(LAY, blk, hc_attn_base, "R,MIX", IN),                                     \
    ARG_IN(LAY, blk, attn_norm_w, "R,D", IN),                                        \
    ARG_IN(LAY, blk, wq_a, "R,D,Q", IN),                                             \
    ARG_IN(LAY, blk, wq_b, "R,Q,HHD", IN),                                           \
    ARG_IN(LAY, blk, wq_b_scale, "R,HHD", IN),                                       \
    ARG_IN(LAY, blk, wkv, "R,D,HD", IN),                                             \
    ARG_IN(LAY, blk, gamma_cq, "R,Q", IN),                                           \
    ARG_IN(LAY, blk, gamma_ckv, "R,HD", IN),                                         \
    ARG_IN(LAY, blk, freqs_cos, "R,MAXS,RW", IN),                                    \
    ARG_IN(LAY, blk, freqs_sin, "R,MAXS,RW", IN)
#define LAYER_OPROJ                                                                  \
    ARG_IN(LAY, blk, attn_sink, "R,H", IN),                                          \
    ARG_IN(LAY, blk, wo_a, "R,G,OL,OGI", IN),                                        \
    ARG_IN(LAY, blk, wo_b, "R,D,GOL", IN),                                           \
    ARG_IN(LAY, blk, wo_b_scale, "R,D", IN)
#define LAYER_CMP(P, X, OD, RR, NB, PAGE, W)                                         \
    ARG_AS(LAY, P "cmp_wkv", X.wkv, "R," OD ",D", IN),                               \
    ARG_AS(LAY, P "cmp_wgate", X.wgate, "R," OD ",D", IN),                           \
    ARG_AS(LAY, P "cmp_ape", X.ape, "R," RR "," OD, IN),                             \
    ARG_AS(LAY, P "cmp_norm_w", X.norm_w, "R,HD", IN)
#define LAYER_CSA_INDEXER(WP)                                                        \
    ARG_AS(LAY, "csa_idx_wq_b", blk.idx_wq_b, "R,Q,IHHD", IN),                       \
    ARG_AS(LAY, "csa_idx_wq_b_scale", blk.idx_wq_b_scale, "R,IHHD", IN),             \
    ARG_AS(LAY, "csa_weights_proj", blk.weights_proj, "R,D,IH", IN)
#define LAYER_INNER                                                                  \
    ARG_AS(LAY, "csa_inner_wkv", blk.inner_wkv, "R,IOD,D", IN),                      \
    ARG_AS(LAY, "csa_inner_wgate", blk.inner_wgate, "R,IOD,D", IN),                  \
    ARG_AS(LAY, "csa_inner_ape", blk.inner_ape, "R,IR,IOD", IN),                     \
    ARG_AS(LAY, "csa_inner_norm_w", blk.inner_norm_w, "R,IHD", IN)
#define LAYER_MOE                                                                    \
    ARG_IN(LAY, moe, hc_ffn_fn, "R,MIX,HCD", IN),                                    \
    ARG_IN(LAY, moe, hc_ffn_scale, "R,3", IN),                                       \
    ARG_IN(LAY, moe, hc_ffn_base, "R,MIX", IN),                                      \
    ARG_IN(LAY, moe, norm_w, "R,D", IN),                                             \
    ARG_IN(LAY, moe, gate_w, "R,E,D", IN),                                           \
    ARG_IN(LAY, moe, gate_bias, "R,E", IN),                                          \
    ARG_IN(LAY, moe, tid2eid, "R,V,TOPK", IN),                                       \
    ARG_IN(LAY, moe, input_ids, "R,T", IN),                                          \
    ARG_IN(LAY, moe, routed_w1, "R,EL,I,D", IN),                                     \
    ARG_IN(LAY, moe, routed_w1_scale, "R,EL,I", IN),                                 \
    ARG_IN(LAY, moe, routed_w3, "R,EL,I,D", IN),                                     \
    ARG_IN(LAY, moe, routed_w3_scale, "R,EL,I", IN),                                 \
    ARG_IN(LAY, moe, routed_w2, "R,EL,D,I", IN),                                     \
    ARG_IN(LAY, moe, routed_w2_scale, "R,EL,D", IN),                                 \
    ARG_IN(LAY, moe, shared_w1, "R,I,D", IN),                                        \
    ARG_IN(LAY, moe, shared_w1_scale, "R,I", IN),                                    \
    ARG_IN(LAY, moe, shared_w3, "R,I,D", IN),                                        \
    ARG_IN(LAY, moe, shared_w3_scale, "R,I", IN),                                    \
    ARG_IN(LAY, moe, shared_w2, "R,D,I", IN),                                        \
    ARG_IN(LAY, moe, shared_w2_scale, "R,D", IN),                                    \
    ARG_IN(LAY, moe, x_next, "R,T,HC,D", OUT),                                       \
    ARG_IN(LAY, st, x_mixed, "R,T,D", STAGE),                                        \
    ARG_IN(LAY, st, post, "R,T,HC", STAGE),                                          \
    ARG_IN(LAY, st, comb, "R,T,HC2", STAGE),                                         \
    ARG_IN(LAY, st, x_normed, "R,T,D", STAGE),                                       \
    ARG_IN(LAY, st, q, "R,T,H,HD", STAGE),                                           \
    ARG_IN(LAY, st, kv, "R,T,HD", STAGE),                                            \
    ARG_IN(LAY, st, qr, "R,T,Q", STAGE),                                             \
    ARG_IN(LAY, st, qr_scale, "R,T,1", STAGE),                                       \
    ARG_IN(LAY, st, attn_out, "R,T,D", STAGE),                                       \
    ARG(LAY, x_attn, "R,T,HC,D", STAGE)

static const struct arg_spec dlayer_args[] = {
    ARG_IN(LAY, blk, x_hc, "R,T,HC,D", IN),
    LAYER_FRONT,
    ARG_IN(LAY, blk, kv_cache, "R,OB,BLOCK,1,HD", INOUT),
    ARG_AS(LAY, "block_table", blk.ori_block_table, "R,B,OM", IN),
    ARG_IN(LAY, blk, ori_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "hca_cmp_slot_mapping", hca.cmp_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "hca_state_slot_mapping", hca.state_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_cmp_slot_mapping", csa.cmp_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_idx_slot_mapping", blk.idx_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_state_slot_mapping", csa.state_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_inner_state_slot_mapping", blk.inner_state_slot_mapping, "R,T", IN),
    ARG_IN(LAY, blk, position_ids, "R,T", IN),
    ARG_IN(LAY, blk, kv_seq_lens, "R,B", IN),
    LAYER_OPROJ,
    LAYER_CMP("hca_", hca, "HOD", "HR", "HNB", "HPAGE", "HSW"),
    ARG_AS(LAY, "hca_compress_state", hca.state, "R,HNB,HPAGE,HSW", INOUT),
    ARG_AS(LAY, "hca_compress_state_block_table", hca.table, "R,B,HNP", IN),
    LAYER_CMP("csa_", csa, "COD", "CR", "CNB", "CPAGE", "CSW"),
    ARG_AS(LAY, "csa_compress_state", csa.state, "R,CNB,CPAGE,CSW", INOUT),
    ARG_AS(LAY, "csa_compress_state_block_table", csa.table, "R,B,CNP", IN),
    LAYER_CSA_INDEXER(0),
    ARG_AS(LAY, "csa_hadamard_idx", blk.hadamard_idx, "R,IHD,IHD", IN),
    LAYER_INNER,
    ARG_AS(LAY, "csa_inner_compress_state", blk.inner_compress_state, "R,INB,IPAGE,ISW", INOUT),
    ARG_AS(LAY, "csa_inner_compress_state_block_table", blk.inner_compress_state_block_table,
        "R,B,INP", IN),
    ARG_IN(LAY, blk, cmp_kv, "R,CB,BLOCK,1,HD", INOUT),
    ARG_IN(LAY, blk, cmp_block_table, "R,B,CM", IN),
    ARG_IN(LAY, blk, idx_kv_cache, "R,NI,BLOCK,1,IHD", INOUT),
    ARG_IN(LAY, blk, idx_block_table, "R,B,NBT", IN),
    LAYER_MOE,
    {0}};
static const struct arg_spec player_args[] = {
    ARG_IN(LAY, blk, x_hc, "R,T,HC,D", IN),
    ARG(LAY, seq_lens, "R,NREQ", IN),
    ARG(LAY, chunk_lens, "R,NREQ", IN),
    ARG(LAY, chunk_offsets, "R,NREQ", IN),
    ARG(LAY, chunk_tile_offsets, "R,NREQ", IN),
    LAYER_FRONT,
    LAYER_CMP("hca_", hca, "HOD", "HR", "HNB", "HPAGE", "HSW"),
    ARG_AS(LAY, "hca_cmp_kv_state", hca.kv_state, "R,HNB,HPAGE,HOD", INOUT),
    ARG_AS(LAY, "hca_cmp_score_state", hca.score_state, "R,HNB,HPAGE,HOD", INOUT),
    ARG_AS(LAY, "hca_compress_state_block_table", hca.table, "R,HNP", IN),
    LAYER_CMP("csa_", csa, "COD", "CR", "CNB", "CPAGE", "CSW"),
    ARG_AS(LAY, "csa_cmp_kv_state", csa.kv_state, "R,CNB,CPAGE,COD", INOUT),
    ARG_AS(LAY, "csa_cmp_score_state", csa.score_state, "R,CNB,CPAGE,COD", INOUT),
    ARG_AS(LAY, "csa_compress_state_block_table", csa.table, "R,CNP", IN),
    ARG_AS(LAY, "csa_hadamard_idx", blk.hadamard_idx, "R,IHD,IHD", IN),
    LAYER_CSA_INDEXER(0),
    LAYER_INNER,
    ARG_AS(LAY, "csa_inner_kv_state", blk.inner_kv_state, "R,INB,IPAGE,IOD", INOUT),
    ARG_AS(LAY, "csa_inner_score_state", blk.inner_score_state, "R,INB,IPAGE,IOD", INOUT),
    ARG_AS(LAY, "csa_inner_compress_state_block_table", blk.inner_compress_state_block_table,
        "R,INP", IN),
    ARG_IN(LAY, blk, kv_cache, "R,OB,BLOCK,1,HD", INOUT),
    ARG_IN(LAY, blk, ori_block_table, "R,OM", IN),
    ARG_IN(LAY, blk, ori_slot_mapping, "R,T", IN),
    ARG_IN(LAY, blk, cmp_kv, "R,CB,BLOCK,1,HD", INOUT),
    ARG_IN(LAY, blk, cmp_block_table, "R,CM", IN),
    ARG_IN(LAY, blk, cmp_sparse_indices, "R,T,K", IN),
    ARG_IN(LAY, blk, cmp_sparse_lens, "R,T", IN),
    ARG_IN(LAY, blk, idx_kv_cache, "R,NI,BLOCK,1,IHD", INOUT),
    ARG_IN(LAY, blk, idx_block_table, "R,NBT", IN),
    ARG_IN(LAY, blk, position_ids, "R,T", IN),
    ARG_AS(LAY, "hca_cmp_slot_mapping", hca.cmp_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "hca_state_slot_mapping", hca.state_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_cmp_slot_mapping", csa.cmp_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_idx_slot_mapping", blk.idx_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_state_slot_mapping", csa.state_slot_mapping, "R,T", IN),
    ARG_AS(LAY, "csa_inner_state_slot_mapping", blk.inner_state_slot_mapping, "R,T", IN),
    LAYER_OPROJ,
    LAYER_MOE,
    {0}};
#define LAYER_SCALARS                                                                \
    SCALAR(LAY, layer_id, 0, 0, 0.0),                                                \
    SCALAR(LAY, compress_ratio, PER_LAYER, 0, 0.0),                                  \
    SCALAR(LAY, num_hidden_layers, 1, 0, 0.0),                                       \
    SCALAR_IN(LAY, blk, sliding_window, 1, 0, 0.0),                                  \
    SCALAR_IN(LAY, blk, qk_rope_head_dim, 1, 0, 0.0),                                \
    SCALAR_IN(LAY, blk, index_topk, 1, 0, 0.0),                                      \
    SCALAR_IN(LAY, blk, index_n_heads, 1, 0, 0.0),                                   \
    SCALAR_IN(LAY, blk, index_head_dim, 1, 0, 0.0),                                  \
    SCALAR_IN(LAY, blk, max_position_embeddings, 1, 0, 0.0),                         \
    SCALAR_IN(LAY, blk, hc_sinkhorn_iters, 1, 0, 0.0),                               \
    SCALAR_IN(LAY, blk, rms_norm_eps, 1, 0, 0.0),                                    \
    SCALAR_IN(LAY, blk, hc_eps, 1, 0, 0.0),                                          \
    SCALAR_IN(LAY, blk, index_weights_scale, 1, 0, 0.0),                             \
    SCALAR_IN(LAY, moe, num_hash_layers, 1, 0, 0.0),                                 \
    SCALAR_IN(LAY, moe, num_experts_per_tok, 1, 0, 0.0),                             \
    SCALAR_IN(LAY, moe, routed_scaling_factor, 1, 0, 0.0),                           \
    SCALAR_IN(LAY, moe, swiglu_limit, 1, 0, 0.0)
static const struct scalar_spec layer_scalars[] = {LAYER_SCALARS, {0}};

#define MTP struct dsv4_mtp_projection_args
static const struct dim_spec mtp_dims[] = {DIM(MTP, T), DIM(MTP, HC), DIM(MTP, D), {0}};
static const struct arg_spec mtp_args[] = {
    ARG(MTP, hidden_states, "T,D", IN),
    ARG(MTP, prev_hidden_states, "T,HC,D", IN),
    ARG(MTP, enorm_w, "D", IN),
    ARG(MTP, hnorm_w, "D", IN),
    ARG(MTP, e_proj_w, "D,D", IN),
    ARG(MTP, e_proj_w_scale, "D", IN),
    ARG(MTP, e_proj_smooth, "D", IN),
    ARG(MTP, h_proj_w, "D,D", IN),
    ARG(MTP, h_proj_w_scale, "D", IN),
    ARG(MTP, h_proj_smooth, "D", IN),
    ARG(MTP, hidden_states_out, "T,HC,D", OUT),
    {0}};
static const struct scalar_spec mtp_scalars[] = {
    SCALAR(MTP, rms_norm_eps, 1, 0, 0.0), {0}};

#define LMH struct dsv4_lm_head_args
static const struct dim_spec lm_head_dims[] = {
    DIM(LMH, R), DIM(LMH, T), DIM(LMH, D), DIM(LMH, P), DIM(LMH, VS), DIM(LMH, V), {0}};
static const struct arg_spec lm_head_args[] = {
    ARG(LMH, hidden_states, "R,T,D", IN),
    ARG(LMH, lm_head_weight, "P,VS,D", IN),
    ARG(LMH, logits, "R,T,V", OUT),
    {0}};

#define PMT struct dsv4_prefill_mtp_args
static const struct dim_spec prefill_mtp_dims[] = {
    DIM(PMT, R),
    DIM_IN(PMT, blk, T), DIM_IN(PMT, blk, HC), DIM_IN(PMT, blk, D), DIM_IN(PMT, blk, MIX),
    DIM_IN(PMT, blk, HCD), DIM_IN(PMT, blk, Q), DIM_IN(PMT, blk, HHD), DIM_IN(PMT, blk, HD),
    DIM_IN(PMT, blk, H), DIM_IN(PMT, blk, MAXS), DIM_IN(PMT, blk, RW), DIM_IN(PMT, blk, OB),
    DIM_IN(PMT, blk, BLOCK), DIM_IN(PMT, blk, OM), DIM_IN(PMT, blk, K), DIM_IN(PMT, blk, G),
    DIM_IN(PMT, blk, OL), DIM_IN(PMT, blk, OGI), DIM_IN(PMT, blk, GOL),
    DIM_IN(PMT, moe, E), DIM_IN(PMT, moe, V), DIM_AS(PMT, "TOPK", moe.K), DIM_IN(PMT, moe, EL),
    DIM_AS(PMT, "I", moe.IE), {0}};
static const struct arg_spec prefill_mtp_args[] = {
    ARG_IN(PMT, proj, hidden_states, "R,T,D", IN),
    ARG_IN(PMT, proj, prev_hidden_states, "R,T,HC,D", IN),
    ARG_IN(PMT, proj, enorm_w, "R,D", IN),
    ARG_IN(PMT, proj, hnorm_w, "R,D", IN),
    ARG_IN(PMT, proj, e_proj_w, "R,D,D", IN),
    ARG_IN(PMT, proj, e_proj_w_scale, "R,D", IN),
    ARG_IN(PMT, proj, e_proj_smooth, "R,D", IN),
    ARG_IN(PMT, proj, h_proj_w, "R,D,D", IN),
    ARG_IN(PMT, proj, h_proj_w_scale, "R,D", IN),
    ARG_IN(PMT, proj, h_proj_smooth, "R,D", IN),
    ARG_IN(PMT, blk, hc_attn_fn, "R,MIX,HCD", IN),
    ARG_IN(PMT, blk, hc_attn_scale, "R,3", IN),
    ARG_IN(PMT, blk, hc_attn_base, "R,MIX", IN),
    ARG_IN(PMT, blk, attn_norm_w, "R,D", IN),
    ARG_IN(PMT, blk, wq_a, "R,D,Q", IN),
    ARG_IN(PMT, blk, wq_b, "R,Q,HHD", IN),
    ARG_IN(PMT, blk, wq_b_scale, "R,HHD", IN),
    ARG_IN(PMT, blk, wkv, "R,D,HD", IN),
    ARG_IN(PMT, blk, gamma_cq, "R,Q", IN),
    ARG_IN(PMT, blk, gamma_ckv, "R,HD", IN),
    ARG_IN(PMT, blk, freqs_cos, "R,MAXS,RW", IN),
    ARG_IN(PMT, blk, freqs_sin, "R,MAXS,RW", IN),
    ARG_IN(PMT, blk, kv_cache, "R,OB,BLOCK,1,HD", INOUT),
    ARG_IN(PMT, blk, ori_block_table, "R,OM", IN),
    ARG_IN(PMT, blk, ori_slot_mapping, "R,T", IN),
    ARG_IN(PMT, blk, cmp_sparse_indices, "R,T,K", IN),
    ARG_IN(PMT, blk, cmp_sparse_lens, "R,T", IN),
    ARG_IN(PMT, blk, position_ids, "R,T", IN),
    ARG_IN(PMT, blk, attn_sink, "R,H", IN),
    ARG_IN(PMT, blk, wo_a, "R,G,OL,OGI", IN),
    ARG_IN(PMT, blk, wo_b, "R,D,GOL", IN),
    ARG_IN(PMT, blk, wo_b_scale, "R,D", IN),
    ARG_IN(PMT, moe, hc_ffn_fn, "R,MIX,HCD", IN),
    ARG_IN(PMT, moe, hc_ffn_scale, "R,3", IN),
    ARG_IN(PMT, moe, hc_ffn_base, "R,MIX", IN),
    ARG_IN(PMT, moe, norm_w, "R,D", IN),
    ARG_IN(PMT, moe, gate_w, "R,E,D", IN),
    ARG_IN(PMT, moe, gate_bias, "R,E", IN),
    ARG_IN(PMT, moe, tid2eid, "R,V,TOPK", IN),
    ARG_IN(PMT, moe, input_ids, "R,T", IN),
    ARG_IN(PMT, moe, routed_w1, "R,EL,I,D", IN),
    ARG_IN(PMT, moe, routed_w1_scale, "R,EL,I", IN),
    ARG_IN(PMT, moe, routed_w3, "R,EL,I,D", IN),
    ARG_IN(PMT, moe, routed_w3_scale, "R,EL,I", IN),
    ARG_IN(PMT, moe, routed_w2, "R,EL,D,I", IN),
    ARG_IN(PMT, moe, routed_w2_scale, "R,EL,D", IN),
    ARG_IN(PMT, moe, shared_w1, "R,I,D", IN),
    ARG_IN(PMT, moe, shared_w1_scale, "R,I", IN),
    ARG_IN(PMT, moe, shared_w3, "R,I,D", IN),
    ARG_IN(PMT, moe, shared_w3_scale, "R,I", IN),
    ARG_IN(PMT, moe, shared_w2, "R,D,I", IN),
    ARG_IN(PMT, moe, shared_w2_scale, "R,D", IN),
    ARG_AS(PMT, "mtp_hc_head_fn", head.hc_head_fn, "R,HC,HCD", IN),
    ARG_AS(PMT, "mtp_hc_head_scale", head.hc_head_scale, "R,1", IN),
    ARG_AS(PMT, "mtp_hc_head_base", head.hc_head_base, "R,HC", IN),
    ARG(PMT, mtp_norm_w, "R,D", IN),
    ARG(PMT, hidden_out, "R,T,D", OUT),
    ARG_AS(PMT, "pre_hc_hidden_out", moe.x_next, "R,T,HC,D", OUT),
    ARG(PMT, projected, "R,T,HC,D", STAGE),
    ARG(PMT, x_attn, "R,T,HC,D", STAGE),
    ARG(PMT, x_head, "R,T,D", STAGE),
    {0}};
static const struct scalar_spec prefill_mtp_scalars[] = {
    SCALAR(PMT, num_tokens, 0, ALL_ROWS, 0.0),
    SCALAR(PMT, num_hidden_layers, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, sliding_window, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, qk_rope_head_dim, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, index_topk, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, index_n_heads, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, index_head_dim, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, max_position_embeddings, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, hc_sinkhorn_iters, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, rms_norm_eps, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, hc_eps, 1, 0, 0.0),
    SCALAR_IN(PMT, blk, index_weights_scale, 1, 0, 0.0),
    SCALAR_IN(PMT, moe, num_hash_layers, 1, 0, 0.0),
    SCALAR_IN(PMT, moe, num_experts_per_tok, 1, 0, 0.0),
    SCALAR_IN(PMT, moe, routed_scaling_factor, 1, 0, 0.0),
    SCALAR_IN(PMT, moe, swiglu_limit, 1, 0, 0.0),
    {0}};

#define CAST struct dsv4_cast_args
static const struct dim_spec cast_dims[] = {DIM(CAST, N), {0}};
static const struct arg_spec f32_bf16_args[] = {
    ARG_DT(CAST, x, DSV4_F32, "N", IN), ARG_DT(CAST, y, DSV4_BF16, "N", OUT), {0}};
static const struct arg_spec f32_fp8_args[] = {
    ARG_DT(CAST, x, DSV4_F32, "N", IN), ARG_DT(CAST, y, DSV4_FP8, "N", OUT), {0}};
static const struct arg_spec f32_f32_args[] = {
    ARG_DT(CAST, x, DSV4_F32, "N", IN), ARG_DT(CAST, y, DSV4_F32, "N", OUT), {0}};
static const struct arg_spec fp8_f32_args[] = {
    ARG_DT(CAST, x, DSV4_FP8, "N", IN), ARG_DT(CAST, y, DSV4_F32, "N", OUT), {0}};

#define QI8 struct dsv4_quant_int8_args
static const struct dim_spec qi8_dims[] = {DIM(QI8, M), DIM(QI8, N), {0}};
static const struct arg_spec qi8_args[] = {
    ARG(QI8, x, "M,N", IN),
    ARG(QI8, y, "M,N", OUT),
    ARG(QI8, scale, "M,1", OUT),
    {0}};

#define MM struct dsv4_matmul_args
static const struct dim_spec mm_dims[] = {DIM(MM, M), DIM(MM, K), DIM(MM, N), {0}};
static const struct arg_spec mm_bf16_args[] = {
    ARG_DT(MM, a, DSV4_BF16, "M,K", IN),
    ARG_DT(MM, b, DSV4_BF16, "K,N", IN),
    ARG_DT(MM, c, DSV4_F32, "M,N", OUT),
    {0}};
static const struct arg_spec mm_i8_args[] = {
    ARG_DT(MM, a, DSV4_I8, "M,K", IN),
    ARG_DT(MM, b, DSV4_I8, "K,N", IN),
    ARG_DT(MM, c, DSV4_I32, "M,N", OUT),
    {0}};
static const struct arg_spec mm_i8_nt_args[] = {
    ARG_DT(MM, a, DSV4_I8, "M,K", IN),
    ARG_DT(MM, b, DSV4_I8, "N,K", IN),
    ARG_DT(MM, c, DSV4_I32, "M,N", OUT),
    {0}};

#define ROPE struct dsv4_rope_args
static const struct dim_spec rope_dims[] = {DIM(ROPE, M), DIM(ROPE, R), DIM(ROPE, RW), {0}};
static const struct arg_spec rope_args[] = {
    ARG(ROPE, x, "M,R", IN),
    ARG(ROPE, cos, "M,RW", IN),
    ARG(ROPE, sin, "M,RW", IN),
    ARG(ROPE, y, "M,R", OUT),
    {0}};

static const struct scalar_spec no_scalars[] = {{0}};

#define ROW(NAME, DOC, INTERNAL, VAR, S, ARGS, SCALARS, DIMS, FN)                        \
    {NAME, DOC, INTERNAL, VAR, sizeof(struct S),                                         \
     offsetof(struct S, variant) +                                                       \
         CHECK(IS_TYPE(FIELD(struct S, variant), int), #S ": variant must be an int"),   \
     offsetof(struct S, scratch) +                                                       \
         CHECK(IS_TYPE(FIELD(struct S, scratch), void *), #S ": scratch must be void *"), \
     ARGS, SCALARS, DIMS, FN##_prepare, FN}

static const struct kernel_spec kernels[] = {
    ROW("rms_norm",
        "Attention-input RMSNorm: x_normed = bf16((x * rsqrt(mean(x^2) + eps)) * norm_w).",
        0, 0, dsv4_rms_norm_args, rms_args, rms_scalars, rms_dims, dsv4_rms_norm),
    ROW("qkv_proj_rope",
        "Q/KV projection with RoPE for an already normalised input (pypto-lib qkv_proj_rope): "
        "q latent -> RMSNorm(gamma_cq) -> int8 (qr, qr_scale) -> W8A8 up-projection -> per-head "
        "RMSNorm -> RoPE; kv = RMSNorm(x @ wkv, gamma_ckv) -> RoPE. One RoPE row per token.",
        0, DSV4_QKV_PLAIN, dsv4_qkv_proj_rope_args, qkv_args, qkv_scalars, qkv_dims,
        dsv4_qkv_proj_rope),
    ROW("decode_qkv_proj_rope",
        "Decode variant of qkv_proj_rope (pypto-lib PR #385): attention RMSNorm with norm_w fused "
        "in front (its output rounded to bf16), the q latent rounded to bf16 before int8 "
        "quantisation, one RoPE row per token. even_select_t/odd_select_t are accepted and "
        "ignored, as pypto-lib's golden ignores them.",
        0, DSV4_QKV_DECODE, dsv4_qkv_proj_rope_args, decode_qkv_args, qkv_scalars, qkv_dims,
        dsv4_qkv_proj_rope),
    ROW("prefill_qkv_proj_rope",
        "Prefill variant of qkv_proj_rope (pypto-lib PR #374): as decode_qkv_proj_rope, with "
        "RoPE rows start_pos..start_pos+S-1 of the tables freqs_cos/freqs_sin for every batch "
        "row. start_pos + S beyond the tables is a ValueError.",
        0, DSV4_QKV_PREFILL, dsv4_qkv_proj_rope_args, prefill_qkv_args, prefill_qkv_scalars,
        qkv_dims, dsv4_qkv_proj_rope),
    ROW("hc_pre",
        "Hyper-connection pre-mix: 24 logits from an RMS-normalised projection of the HC streams "
        "give the stream weights pre (collapsed into x_mixed, ties-away bf16), post and the "
        "Sinkhorn-normalised comb that hc_post uses.",
        0, 0, dsv4_hc_pre_args, hc_pre_args, hc_pre_scalars, hc_pre_dims, dsv4_hc_pre),
    ROW("hc_post",
        "Hyper-connection post-mix: y[t, o] = bf16(x[t] * post[t, o] + sum_i residual[t, i] * "
        "comb[t, HC*i + o]), summed in that order.",
        0, 0, dsv4_hc_post_args, hc_post_args, no_scalars, hc_post_dims, dsv4_hc_post),
    ROW("hc_head",
        "Hyper-connection head: the HC streams collapsed by sigmoid weights, pairwise, into "
        "y [T, D] (ties-away bf16). Any T.",
        0, 0, dsv4_hc_head_args, hc_head_args, hc_head_scalars, hc_head_dims, dsv4_hc_head),
    ROW("gate",
        "MoE gate: RMSNorm of x_mixed, per-token int8 quantisation, sqrt(softplus) router "
        "scores, top-K experts by score + bias (stable; lower id wins a tie) or from tid2eid in "
        "hash layers (layer_id < num_hash_layers), weights = score / sum * routed_scaling_factor. "
        "Tokens from num_tokens on get zero scale, indices and weights.",
        0, 0, dsv4_gate_args, gate_args, gate_scalars, gate_dims, dsv4_gate),
    ROW("expert_shared",
        "Shared expert on the gate's int8 rows: W8A8 SwiGLU FFN (swiglu_limit clamps), h "
        "requantised to int8 per row before the down projection.",
        0, 0, dsv4_expert_shared_args, shx_args, shx_scalars, shx_dims, dsv4_expert_shared),
    ROW("expert_routed",
        "Routed experts on their receive buffers: rows [0, recv_expert_count[e]) of expert e "
        "through its W8A8 SwiGLU FFN, the routing weight folded into h's dequant scale; rows "
        "beyond the count come out zero.",
        0, 0, dsv4_expert_routed_args, rtx_args, rtx_scalars, rtx_dims, dsv4_expert_routed),
    ROW("moe",
        "MoE block of an expert-parallel world of R ranks simulated in one process: per rank "
        "hc_pre, gate, shared expert; every route evaluated by the owning rank's shard; combine "
        "in k order onto the shared output; hc_post. Routing that overflows an expert's receive "
        "buffer (R*T rows) is a ValueError.",
        0, 0, dsv4_moe_args, moe_args, moe_scalars, moe_dims, dsv4_moe),
    ROW("prefill_sparse_attn",
        "Prefill sparse attention of one chunk: each token attends the rows its index list "
        "names (ring cache, the chunk's own KV rows below num_tokens, compressed cache), "
        "compacted and taken 128 at a time, plus a per-head sink; inverse RoPE; grouped "
        "output projection with per-(token, group) int8 quantisation.",
        0, DSV4_ATTN_PREFILL, dsv4_sparse_attn_args, prefill_attn_args, prefill_attn_scalars,
        attn_dims, dsv4_sparse_attn),
    ROW("decode_sparse_attn",
        "Decode sparse attention, CSA layers: window + indexer top-k columns in positional "
        "tiles of 128 (invalid columns masked), sink, inverse RoPE, grouped int8 output "
        "projection. valid_block_mask is accepted and not read, as in pypto-lib's golden.",
        0, DSV4_ATTN_DECODE, dsv4_sparse_attn_args, decode_attn_args, decode_attn_scalars,
        attn_dims, dsv4_sparse_attn),
    ROW("decode_sparse_attn_hca",
        "Decode sparse attention, HCA layers: as decode_sparse_attn over all index columns "
        "(window, relocated overlay, compressed tail).",
        0, DSV4_ATTN_DECODE, dsv4_sparse_attn_args, hca_attn_args, decode_attn_scalars,
        attn_dims, dsv4_sparse_attn),
    ROW("decode_sparse_attn_swa",
        "Decode sliding-window attention: the request's ring page and the step's overlay rows "
        "as two tiles, validity taken as sets from the index row (duplicates once, compressed "
        "indices ignored); T <= 128. cmp_kv, cmp_block_table and win_bias are accepted and "
        "not read.",
        0, DSV4_ATTN_SWA, dsv4_sparse_attn_args, swa_attn_args, decode_attn_scalars,
        attn_dims, dsv4_sparse_attn),
    ROW("decode_compressor_ratio4",
        "CSA KV compressor, one decode step (S = 1): each token's kv and score (+ape) "
        "projections go to the paged state; a token completing a window of 4 pools the "
        "overlapping 8 rows (front halves of the previous window, back halves of this one), "
        "RMSNorm, RoPE, and writes kv and one cmp_kv_cache row. States and caches in place.",
        0, 4, dsv4_decode_compressor_args, dcp_args, dcp_scalars, dcp_dims, dsv4_decode_compressor),
    ROW("decode_compressor_ratio128",
        "HCA KV compressor, one decode step (S = 1): as decode_compressor_ratio4 with windows of "
        "128 positions and no overlap.",
        0, 128, dsv4_decode_compressor_args, dcp_args, dcp_scalars, dcp_dims, dsv4_decode_compressor),
    ROW("prefill_compressor_ratio4",
        "CSA KV compressor, one prefill chunk of one request: every token with a "
        "cmp_slot_mapping entry pools its overlapping 8-row window (online form) from the state "
        "before the chunk overlaid with the chunk's rows, RMSNorm, RoPE at the window start, "
        "one cmp_kv row; then the chunk's rows are appended to kv_state / score_state.",
        0, 4, dsv4_prefill_compressor_args, pcp_args, pcp_scalars, pcp_dims, dsv4_prefill_compressor),
    ROW("prefill_compressor_ratio128",
        "HCA KV compressor, one prefill chunk (T <= 128): as prefill_compressor_ratio4 with "
        "windows of 128 positions, no overlap, batch-form pooling, missing rows as (0, 0).",
        0, 128, dsv4_prefill_compressor_args, pcp_args, pcp_scalars, pcp_dims, dsv4_prefill_compressor),
    ROW("decode_indexer_compressor",
        "Indexer-key compressor, one decode step (S = 1): decode_compressor_ratio4 on 128-wide "
        "keys, the entry rounded to bf16 and multiplied by hadamard (row vector on the left) "
        "before it goes to kv and idx_kv_cache.",
        0, 4, dsv4_decode_compressor_args, dic_args, dcp_scalars, dcp_dims, dsv4_decode_compressor),
    ROW("prefill_indexer_compressor",
        "Indexer-key compressor, one prefill chunk: prefill_compressor_ratio4 on 128-wide keys, "
        "bf16, times hadamard, into idx_kv_cache; kv lists the first W = max(1, T/4) keys in "
        "write order. idx_block_table is accepted and not read, as in pypto-lib.",
        0, 4, dsv4_prefill_compressor_args, pic_args, pcp_scalars, pic_dims, dsv4_prefill_compressor),
    ROW("decode_indexer",
        "Lightning indexer, one decode step (S = 1): per-head int8 queries (W8A8 up-projection, "
        "RoPE, bf16, Hadamard), the inner indexer-key compressor commits this step's key, every "
        "visible compressed key is scored, the top index_topk slots + offset are reported. "
        "inner_kv and inner_compress_state are updated in place.",
        0, 0, dsv4_decode_indexer_args, dix_args, dix_scalars, dix_dims, dsv4_decode_indexer),
    ROW("prefill_indexer",
        "Lightning indexer, one prefill chunk: the inner compressor commits the chunk's keys, "
        "each token's queries score the compressed keys it can see (at most two cache blocks), "
        "top-k slots + sliding_window + T for tokens below num_tokens.",
        0, 0, dsv4_prefill_indexer_args, pix_args, pix_scalars, pix_dims, dsv4_prefill_indexer),
    ROW("decode_attention_swa",
        "Decode attention block, sliding-window layer (pypto-lib decode_attention_swa): hc_pre, "
        "RMSNorm, Q/KV projection with the tokens' RoPE rows, attention over the request's ring "
        "page and the token itself, grouped output projection, then kv into kv_cache at "
        "ori_slot_mapping, hc_post. cmp_kv and cmp_block_table are accepted and not read.",
        0, DSV4_BLOCK_SWA, dsv4_attention_block_args, dswa_args, decode_block_scalars,
        block_dims, dsv4_attention_block),
    ROW("decode_attention_hca",
        "Decode attention block, HCA layer (ratio 128): as decode_attention_swa, with the "
        "ratio-128 compressor (compress_state, and cmp_kv at a window's last token) before the "
        "attention, which also reads every visible compressed row. One token per request.",
        0, DSV4_BLOCK_HCA, dsv4_attention_block_args, dhca_args, decode_block_scalars,
        block_dims, dsv4_attention_block),
    ROW("decode_attention_csa",
        "Decode attention block, CSA layer (ratio 4): the ratio-4 compressor, the lightning "
        "indexer (its inner compressor writes idx_kv_cache) choosing up to index_topk "
        "compressed rows, attention over the window and the visible chosen rows. One token "
        "per request.",
        0, DSV4_BLOCK_CSA, dsv4_attention_block_args, dcsa_args, decode_block_scalars,
        block_dims, dsv4_attention_block),
    ROW("prefill_attention_swa",
        "Prefill attention block, sliding-window layer, one tile of one request: the first "
        "num_tokens rows attend the rows cmp_sparse_indices / cmp_sparse_lens name; their kv "
        "goes to kv_cache after the attention.",
        0, DSV4_BLOCK_SWA | DSV4_BLOCK_PREFILL, dsv4_attention_block_args, pswa_args,
        prefill_block_scalars, block_dims, dsv4_attention_block),
    ROW("prefill_attention_hca",
        "Prefill attention block, HCA layer (T <= 128): the ratio-128 prefill compressor (both "
        "state pools, cmp_kv) before the attention over the given index rows.",
        0, DSV4_BLOCK_HCA | DSV4_BLOCK_PREFILL, dsv4_attention_block_args, phca_args,
        prefill_block_scalars, block_dims, dsv4_attention_block),
    ROW("prefill_attention_csa",
        "Prefill attention block, CSA layer: the ratio-4 prefill compressor, the prefill "
        "indexer, the block's own index rows (window with the tile's overlay, then the visible "
        "indexer picks, compacted), attention, ring write-back, hc_post.",
        0, DSV4_BLOCK_CSA | DSV4_BLOCK_PREFILL, dsv4_attention_block_args, pcsa_args,
        prefill_block_scalars, block_dims, dsv4_attention_block),
    ROW("decode_layer",
        "Decode layer (pypto-lib decode_layer) on R ranks: the attention block of layer_id's "
        "kind (config compress_ratios: 0 SWA, 128 HCA, 4 CSA) on each rank's requests and "
        "caches, then the MoE across the ranks (hash routing below num_hash_layers). The "
        "caches and states of the active kind are updated in place.",
        0, 0, dsv4_layer_args, dlayer_args, layer_scalars, layer_dims, dsv4_layer),
    ROW("prefill_layer",
        "Packed, chunked prefill layer (pypto-lib prefill_layer): requests of chunk_lens new "
        "tokens after seq_lens - chunk_lens of history, each padded to whole tiles of 128 rows "
        "from chunk_offsets; per request, per tile, per rank the attention block over the "
        "request's own slice of every cache and state, then the MoE on the tile. Padding rows "
        "of x_next are zero.",
        0, 1, dsv4_layer_args, player_args, layer_scalars, layer_dims, dsv4_layer),
    ROW("mtp_projection",
        "MTP input projection (pypto-lib mtp_projection): e_proj(enorm(hidden_states)) + "
        "h_proj(hnorm(prev_hidden_states)) for every HC lane, both W8A8 (per-row int8 "
        "activations, int8 weights with per-output-row scales), summed in fp32 and rounded to "
        "bf16.",
        0, 0, dsv4_mtp_projection_args, mtp_args, mtp_scalars, mtp_dims, dsv4_mtp_projection),
    ROW("lm_head",
        "LM head (pypto-lib lm_head): every owner rank's hidden rows times every tensor-parallel "
        "vocabulary shard, fp32 sums; logits[o] = the shards' logits concatenated in rank "
        "order (V = P * VS).",
        0, 0, dsv4_lm_head_args, lm_head_args, no_scalars, lm_head_dims, dsv4_lm_head),
    ROW("prefill_mtp",
        "MTP block on one prefill tile of R expert-parallel ranks (pypto-lib prefill_mtp): per "
        "rank mtp_projection, then the sliding-window prefill attention block (kv_cache in "
        "place; the first num_tokens rows active); the MoE across the ranks at the MTP layer "
        "(layer_id = num_hidden_layers) -> pre_hc_hidden_out; per rank hc_head with the "
        "mtp_hc_head_* weights and rms_norm with mtp_norm_w -> hidden_out.",
        0, 0, dsv4_prefill_mtp_args, prefill_mtp_args, prefill_mtp_scalars, prefill_mtp_dims,
        dsv4_prefill_mtp),
    ROW("cast_bf16", "fp32 -> bf16, round to nearest, ties to even.",
        1, DSV4_CAST_BF16, dsv4_cast_args, f32_bf16_args, no_scalars, cast_dims, dsv4_cast),
    ROW("cast_bf16_haz", "fp32 -> bf16, round to nearest, ties away from zero.",
        1, DSV4_CAST_BF16_HAZ, dsv4_cast_args, f32_bf16_args, no_scalars, cast_dims, dsv4_cast),
    ROW("cast_fp8", "fp32 -> float8_e4m3fn, round to nearest even; beyond 448 -> NaN.",
        1, DSV4_CAST_FP8, dsv4_cast_args, f32_fp8_args, no_scalars, cast_dims, dsv4_cast),
    ROW("fp8_to_f32", "float8_e4m3fn -> fp32 (exact).",
        1, DSV4_CAST_FP8_F32, dsv4_cast_args, fp8_f32_args, no_scalars, cast_dims, dsv4_cast),
    ROW("exp_f32", "e^x rounded to fp32 (computed in double), as the attention softmax uses it.",
        1, DSV4_CAST_EXP, dsv4_cast_args, f32_f32_args, no_scalars, cast_dims, dsv4_cast),
    ROW("quant_int8", "Per-row int8 quantisation: y = rint(x * (1/amax) * 127), scale = 1/sq.",
        1, 0, dsv4_quant_int8_args, qi8_args, no_scalars, qi8_dims, dsv4_quant_int8),
    ROW("matmul_bf16", "c = a @ b, bf16 inputs, fp32 accumulation in k order.",
        1, DSV4_MATMUL_BF16, dsv4_matmul_args, mm_bf16_args, no_scalars, mm_dims, dsv4_matmul),
    ROW("matmul_i8", "c = a @ b, int8 inputs, exact int32.",
        1, DSV4_MATMUL_I8, dsv4_matmul_args, mm_i8_args, no_scalars, mm_dims, dsv4_matmul),
    ROW("matmul_i8_nt", "c = a @ b.T for int8 weight rows b [N, K], exact int32.",
        1, DSV4_MATMUL_I8_NT, dsv4_matmul_args, mm_i8_nt_args, no_scalars, mm_dims, dsv4_matmul),
    ROW("rope", "Interleaved RoPE, y bf16.",
        1, 0, dsv4_rope_args, rope_args, no_scalars, rope_dims, dsv4_rope),
    ROW("rope_inv", "Inverse interleaved RoPE, y bf16.",
        1, 1, dsv4_rope_args, rope_args, no_scalars, rope_dims, dsv4_rope),
};
#define NKERNELS ((int)(sizeof kernels / sizeof kernels[0]))

/* ---- dtypes --------------------------------------------------------------- */

static const char *dtype_names[DSV4_NDTYPE] = {"bfloat16", "float32", "int8", "int32",
                                               "float8_e4m3fn", "int64"};
static PyArray_Descr *descrs[DSV4_NDTYPE];

static int init_dtypes(void)
{
    descrs[DSV4_F32] = PyArray_DescrFromType(NPY_FLOAT32);
    descrs[DSV4_I8] = PyArray_DescrFromType(NPY_INT8);
    descrs[DSV4_I32] = PyArray_DescrFromType(NPY_INT32);
    descrs[DSV4_I64] = PyArray_DescrFromType(NPY_INT64);
    PyObject *ml = PyImport_ImportModule("ml_dtypes");
    if (!ml)
        return -1;
    const char *names[2] = {"bfloat16", "float8_e4m3fn"};
    int ids[2] = {DSV4_BF16, DSV4_FP8};
    for (int i = 0; i < 2; i++) {
        PyObject *t = PyObject_GetAttrString(ml, names[i]);
        if (!t || !PyArray_DescrConverter(t, &descrs[ids[i]])) {
            Py_XDECREF(t);
            Py_DECREF(ml);
            return -1;
        }
        Py_DECREF(t);
    }
    Py_DECREF(ml);
    return 0;
}

static int dtype_matches(PyArrayObject *arr, int dt)
{
    return PyArray_EquivTypes(PyArray_DESCR(arr), descrs[dt]) &&
           PyArray_DESCR(arr)->type_num == descrs[dt]->type_num;
}

/* ---- dims ----------------------------------------------------------------- */

#define MAXRANK 8
#define MAXDIMS 64

/* A dims string "T,H,HD" -> per axis: dim index >= 0, literal value as -(v+2), or -1 for "_". */
static int parse_dims(const struct kernel_spec *k, const char *s, int out[MAXRANK])
{
    int n = 0;
    while (*s && n < MAXRANK) {
        const char *e = s;
        while (*e && *e != ',')
            e++;
        size_t len = (size_t)(e - s);
        if (len == 1 && *s == '_') {
            out[n] = -1;
        } else if (*s >= '0' && *s <= '9') {
            out[n] = -(atoi(s) + 2);
        } else {
            out[n] = -1;
            for (int i = 0; k->dims[i].name; i++)
                if (strlen(k->dims[i].name) == len && !strncmp(k->dims[i].name, s, len))
                    out[n] = i;
        }
        n++;
        s = *e ? e + 1 : e;
    }
    return n;
}

static int64_t *dim_field(char *st, const struct kernel_spec *k, int i)
{
    return (int64_t *)(st + k->dims[i].off);
}

static PyObject *shape_str(PyArrayObject *a)
{
    PyObject *shape = PyObject_GetAttrString((PyObject *)a, "shape");
    if (!shape)
        return NULL;
    PyObject *r = PyObject_Str(shape);
    Py_DECREF(shape);
    return r;
}

static void dims_text(const struct kernel_spec *k, const char *dims, char *buf, size_t n)
{
    snprintf(buf, n, "[");
    for (const char *c = dims; *c; c++) {
        size_t l = strlen(buf);
        if (l + 3 < n) {
            if (*c == ',') {
                buf[l] = ',';
                buf[l + 1] = ' ';
                buf[l + 2] = 0;
            } else {
                buf[l] = *c;
                buf[l + 1] = 0;
            }
        }
    }
    size_t l = strlen(buf);
    if (l + 2 < n) {
        buf[l] = ']';
        buf[l + 1] = 0;
    }
}

/* Check one array against its spec and bind its dims. Returns 0 or -1 with an exception set. */
static int check_array(const struct kernel_spec *k, const struct arg_spec *as, PyObject *obj,
                       char *st, const char *bound_by[MAXDIMS])
{
    char want[96];
    dims_text(k, as->dims, want, sizeof want);
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a numpy.ndarray of %s %s, got %s",
                     k->name, as->name, dtype_names[as->dtype], want, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!dtype_matches(arr, as->dtype)) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must have dtype %s, got %S", k->name,
                     as->name, dtype_names[as->dtype], (PyObject *)PyArray_DESCR(arr));
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || !PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: argument '%s' must be a C-contiguous, aligned, native-byte-order array "
                     "(np.ascontiguousarray(%s) gives one)",
                     k->name, as->name, as->name);
        return -1;
    }
    int ax[MAXRANK];
    int rank = parse_dims(k, as->dims, ax);
    npy_intp *shape = PyArray_DIMS(arr);
    if (as->flags & FLAT) {
        int64_t want_n = 1;
        const char *from = "";
        for (int i = 0; i < rank; i++) {
            want_n *= ax[i] >= 0 ? *dim_field(st, k, ax[i]) : -(ax[i] + 2);
            if (ax[i] >= 0 && bound_by[ax[i]])
                from = bound_by[ax[i]];
        }
        if (PyArray_SIZE(arr) != want_n) {
            PyObject *s = shape_str(arr);
            PyErr_Format(PyExc_ValueError,
                         "%s: argument '%s' must hold %s = %lld elements (from '%s'), got shape %S",
                         k->name, as->name, as->dims, (long long)want_n, from, s);
            Py_XDECREF(s);
            return -1;
        }
        return 0;
    }
    if (PyArray_NDIM(arr) != rank) {
        PyObject *s = shape_str(arr);
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have shape %s (rank %d), got shape %S",
                     k->name, as->name, want, rank, s);
        Py_XDECREF(s);
        return -1;
    }
    for (int i = 0; i < rank; i++) {
        int64_t got = shape[i];
        if (ax[i] == -1)
            continue;
        if (ax[i] < -1) {
            if (got != -(ax[i] + 2)) {
                PyObject *s = shape_str(arr);
                PyErr_Format(PyExc_ValueError,
                             "%s: argument '%s' must have shape %s, got shape %S (axis %d must be %d)",
                             k->name, as->name, want, s, i, -(ax[i] + 2));
                Py_XDECREF(s);
                return -1;
            }
            continue;
        }
        int64_t *f = dim_field(st, k, ax[i]);
        if (got < 1) {
            PyObject *s = shape_str(arr);
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' has shape %S; %s must be at least 1",
                         k->name, as->name, s, k->dims[ax[i]].name);
            Py_XDECREF(s);
            return -1;
        }
        if (*f < 0) {
            *f = got;
            bound_by[ax[i]] = as->name;
        } else if (*f != got) {
            PyObject *s = shape_str(arr);
            /* either may be the wrong one: name both */
            if (bound_by[ax[i]])
                PyErr_Format(PyExc_ValueError,
                             "%s: arguments '%s' and '%s' disagree on %s: %lld in '%s', %lld in '%s' "
                             "(shape %S, expected %s)",
                             k->name, bound_by[ax[i]], as->name, k->dims[ax[i]].name,
                             (long long)*f, bound_by[ax[i]], (long long)got, as->name, s, want);
            else
                PyErr_Format(PyExc_ValueError,
                             "%s: argument '%s' must have shape %s, got shape %S: %s is %lld (from "
                             "the model config), not %lld",
                             k->name, as->name, want, s, k->dims[ax[i]].name, (long long)*f,
                             (long long)got);
            Py_XDECREF(s);
            return -1;
        }
    }
    return 0;
}

static int set_scalar(const struct kernel_spec *k, const struct scalar_spec *ss, PyObject *obj,
                      char *st)
{
    if (ss->type == SC_INT) {
        if (PyFloat_Check(obj)) {
            PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be an integer, got %R", k->name,
                         ss->name, obj);
            return -1;
        }
        PyObject *i = PyNumber_Index(obj);
        if (!i) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be an integer, got %s", k->name,
                         ss->name, Py_TYPE(obj)->tp_name);
            return -1;
        }
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
        Py_DECREF(i);
        if (overflow) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' = %R is out of range", k->name,
                         ss->name, obj);
            return -1;
        }
        *(int64_t *)(st + ss->off) = v;
    } else {
        double v = PyFloat_AsDouble(obj);
        if (v == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a number, got %s", k->name,
                         ss->name, Py_TYPE(obj)->tp_name);
            return -1;
        }
        *(float *)(st + ss->off) = (float)v;
    }
    return 0;
}

/* An output buffer given by the caller must be writeable and must not overlap an input. */
static int check_output(const struct kernel_spec *k, int j, PyObject *const *tv)
{
    PyArrayObject *out = (PyArrayObject *)tv[j];
    if (!PyArray_ISWRITEABLE(out)) {
        PyErr_Format(PyExc_ValueError, "%s: output '%s' is read-only (it is written in place)",
                     k->name, k->args[j].name);
        return -1;
    }
    char *lo = PyArray_DATA(out), *hi = lo + PyArray_NBYTES(out);
    for (int i = 0; k->args[i].name; i++) {
        if (i == j || !tv[i] || !PyArray_Check(tv[i]))     /* others are checked in turn */
            continue;
        PyArrayObject *a = (PyArrayObject *)tv[i];
        char *alo = PyArray_DATA(a), *ahi = alo + PyArray_NBYTES(a);
        if (alo < hi && lo < ahi) {
            PyErr_Format(PyExc_ValueError, "%s: output '%s' overlaps argument '%s'", k->name,
                         k->args[j].name, k->args[i].name);
            return -1;
        }
    }
    return 0;
}

/* ---- scratch ---------------------------------------------------------------------
 * Kernels need up to tens of MB of scratch. Fresh pages cost a page fault and a
 * zeroing each, often more than the kernel itself, so the largest buffer of the
 * last call is kept for the next. Concurrent calls each take their own. */
#include <stdatomic.h>

struct scratch_buf { size_t size; max_align_t pad[]; };
static _Atomic(struct scratch_buf *) g_scratch;

static void *scratch_take(size_t n)
{
    struct scratch_buf *b = atomic_exchange(&g_scratch, NULL);
    if (b && b->size < n) {
        free(b);
        b = NULL;
    }
    if (!b) {
        void *p;
        if (posix_memalign(&p, 64, 64 + n))
            return NULL;
        b = p;
        b->size = n;
    }
    return (char *)b + 64;
}

static void scratch_give(void *p)
{
    if (!p)
        return;
    struct scratch_buf *b = (struct scratch_buf *)((char *)p - 64);
    b = atomic_exchange(&g_scratch, b);
    free(b);
}

/* ---- call_kernel ------------------------------------------------------------ */

#define MAXARGS 96

static PyObject *call_kernel(PyObject *self, PyObject *const *pos, Py_ssize_t npos, PyObject *kwnames)
{
    const struct kernel_spec *k = &kernels[PyLong_AsLong(self)];
    PyObject *tv[MAXARGS] = {0}, *sv[MAXARGS] = {0};
    int nt = 0, ns = 0;
    while (k->args[nt].name)
        nt++;
    while (k->scalars[ns].name)
        ns++;
    if (npos) {
        PyErr_Format(PyExc_TypeError, "%s: pass arguments by keyword", k->name);
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int check_only = 0;     /* _check_only=True: validate everything, run nothing */
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *kn = PyTuple_GET_ITEM(kwnames, i);
        int found = 0;
        if (!PyUnicode_CompareWithASCIIString(kn, "_check_only")) {
            if ((check_only = PyObject_IsTrue(pos[i])) < 0)
                return NULL;
            continue;
        }
        for (int j = 0; j < nt && !found; j++)
            if (!PyUnicode_CompareWithASCIIString(kn, k->args[j].name)) {
                tv[j] = pos[i];
                found = 1;
            }
        for (int j = 0; j < ns && !found; j++)
            if (!PyUnicode_CompareWithASCIIString(kn, k->scalars[j].name)) {
                sv[j] = pos[i];
                found = 1;
            }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "%s: unexpected argument '%U'", k->name, kn);
            return NULL;
        }
    }

    char *st = calloc(1, k->size);
    PyObject *outs[MAXARGS] = {0};
    PyObject *result = NULL;
    void *scratch = NULL;
    if (!st)
        return PyErr_NoMemory();
    const char *bound_by[MAXDIMS] = {0};
    for (int i = 0; k->dims[i].name; i++)
        *dim_field(st, k, i) = -1;
    *(int *)(st + k->variant_off) = k->variant;

    /* inputs: shaped ones first, then FLAT ones whose size needs the bound dims */
    for (int pass = 0; pass < 2; pass++)
        for (int j = 0; j < nt; j++) {
            const struct arg_spec *as = &k->args[j];
            if (as->role == OUT || as->role == STAGE || !!(as->flags & FLAT) != pass)
                continue;
            if (!tv[j]) {
                if (as->flags & OPTIONAL)
                    continue;
                char want[96];
                dims_text(k, as->dims, want, sizeof want);
                PyErr_Format(PyExc_TypeError, "%s: missing argument '%s' (%s %s)", k->name,
                             as->name, dtype_names[as->dtype], want);
                goto done;
            }
            if (check_array(k, as, tv[j], st, bound_by))
                goto done;
            if (as->role == INOUT && check_output(k, j, tv))
                goto done;
            if (as->role == IN || as->role == INOUT)
                *(const void **)(st + as->off) = PyArray_DATA((PyArrayObject *)tv[j]);
            if (as->role == INOUT)
                outs[j] = Py_NewRef(tv[j]);
        }
    for (int j = 0; j < ns; j++) {
        const struct scalar_spec *ss = &k->scalars[j];
        if (sv[j]) {
            if (set_scalar(k, ss, sv[j], st))
                goto done;
        } else if (ss->has_default == ALL_ROWS) {
            *(int64_t *)(st + ss->off) = INT64_MAX;
        } else if (ss->has_default) {
            if (ss->type == SC_INT)
                *(int64_t *)(st + ss->off) = (int64_t)ss->dflt;
            else
                *(float *)(st + ss->off) = (float)ss->dflt;
        } else {
            PyErr_Format(PyExc_TypeError, "%s: missing argument '%s'", k->name, ss->name);
            goto done;
        }
    }

    struct dsv4_err err = {{0}};
    size_t nscratch = 0;
    dsv4_call_begin();                /* threads and code path fixed from here to the end */
    if (k->prepare(st, &err, &nscratch)) {
        PyErr_Format(PyExc_ValueError, "%s: %s", k->name, err.msg);
        goto done;
    }
    if (check_only) {
        result = Py_NewRef(Py_None);
        goto done;
    }

    for (int j = 0; j < nt; j++) {
        const struct arg_spec *as = &k->args[j];
        if (as->role != OUT && as->role != STAGE)
            continue;
        if (tv[j]) {                      /* caller's buffer, written in place */
            if (check_array(k, as, tv[j], st, bound_by) || check_output(k, j, tv))
                goto done;
            outs[j] = Py_NewRef(tv[j]);
            *(void **)(st + as->off) = PyArray_DATA((PyArrayObject *)outs[j]);
            continue;
        }
        int ax[MAXRANK];
        int rank = parse_dims(k, as->dims, ax);
        npy_intp shape[MAXRANK];
        for (int i = 0; i < rank; i++)
            shape[i] = ax[i] >= 0 ? *dim_field(st, k, ax[i]) : -(ax[i] + 2);
        Py_INCREF(descrs[as->dtype]);
        outs[j] = PyArray_Empty(rank, shape, descrs[as->dtype], 0);
        if (!outs[j])
            goto done;
        *(void **)(st + as->off) = PyArray_DATA((PyArrayObject *)outs[j]);
    }
    /* a guard band after the scratch: a kernel that writes past its size is a bug, caught here */
    static const unsigned char guard[64] = {0xd5, 0x5d, 0xa5, 0x5a};
    if (!(scratch = scratch_take(nscratch + sizeof guard))) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy((char *)scratch + nscratch, guard, sizeof guard);
    *(void **)(st + k->scratch_off) = scratch;

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = k->run(st, &err);
    Py_END_ALLOW_THREADS
    if (memcmp((char *)scratch + nscratch, guard, sizeof guard)) {
        PyErr_Format(PyExc_SystemError, "%s: the kernel wrote past its scratch", k->name);
        goto done;
    }
    if (status) {
        PyErr_Format(PyExc_ValueError, "%s: %s", k->name, err.msg);
        goto done;
    }

    result = PyDict_New();
    for (int j = 0; result && j < nt; j++)
        if (outs[j] && PyDict_SetItemString(result, k->args[j].name, outs[j])) {
            Py_CLEAR(result);
        }
done:
    dsv4_call_end();
    for (int j = 0; j < nt; j++)
        Py_XDECREF(outs[j]);
    scratch_give(scratch);
    free(st);
    return result;
}

/* ---- introspection and settings ----------------------------------------------- */

static const char *role_names[] = {"in", "out", "unused", "inout", "stage"};

static PyObject *kernel_table(PyObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < NKERNELS; i++) {
        const struct kernel_spec *k = &kernels[i];
        PyObject *args = PyList_New(0), *scalars = PyList_New(0);
        for (int j = 0; args && k->args[j].name; j++) {
            const struct arg_spec *a = &k->args[j];
            PyObject *t = Py_BuildValue("{s:s,s:s,s:s,s:s,s:O,s:O}", "name", a->name, "dtype",
                                        dtype_names[a->dtype], "dims", a->dims, "role",
                                        role_names[a->role], "optional",
                                        (a->flags & OPTIONAL) ? Py_True : Py_False, "flat",
                                        (a->flags & FLAT) ? Py_True : Py_False);
            if (!t || PyList_Append(args, t))
                Py_CLEAR(args);
            Py_XDECREF(t);
        }
        for (int j = 0; scalars && k->scalars[j].name; j++) {
            const struct scalar_spec *s = &k->scalars[j];
            PyObject *dflt = s->has_default == ALL_ROWS ? Py_NewRef(Py_None)
                             : s->has_default
                                 ? (s->type == SC_INT ? PyLong_FromLongLong((long long)s->dflt)
                                                      : PyFloat_FromDouble(s->dflt))
                                 : Py_NewRef(Py_None);
            PyObject *t = Py_BuildValue("{s:s,s:s,s:O,s:O,s:O,s:N}", "name", s->name, "type",
                                        s->type == SC_INT ? "int" : "float", "from_config",
                                        s->from_config ? Py_True : Py_False, "per_layer",
                                        s->from_config == PER_LAYER ? Py_True : Py_False,
                                        "has_default",
                                        s->has_default ? Py_True : Py_False, "default", dflt);
            if (!t || PyList_Append(scalars, t))
                Py_CLEAR(scalars);
            Py_XDECREF(t);
        }
        PyObject *row = args && scalars
                            ? Py_BuildValue("{s:s,s:s,s:O,s:O,s:O}", "name", k->name, "doc", k->doc,
                                            "internal", k->internal ? Py_True : Py_False, "args",
                                            args, "scalars", scalars)
                            : NULL;
        Py_XDECREF(args);
        Py_XDECREF(scalars);
        if (!row || PyList_Append(list, row))
            Py_CLEAR(list);
        Py_XDECREF(row);
    }
    return list;
}

static PyObject *set_num_threads(PyObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in [1, 1024], got %ld", n);
        return NULL;
    }
    dsv4_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *get_num_threads(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(dsv4_num_threads());
}

static PyObject *set_isa(PyObject *self, PyObject *arg)
{
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s)
        return NULL;
    enum dsv4_isa isa;
    if (!strcmp(s, "scalar"))
        isa = DSV4_ISA_SCALAR;
    else if (!strcmp(s, "avx2"))
        isa = DSV4_ISA_AVX2;
    else if (!strcmp(s, "avxvnni"))
        isa = DSV4_ISA_AVXVNNI;
    else if (!strcmp(s, "avx512"))
        isa = DSV4_ISA_AVX512;
    else if (!strcmp(s, "amx"))
        isa = DSV4_ISA_AMX;
    else if (!strcmp(s, "auto"))
        isa = dsv4_best_isa();
    else {
        PyErr_Format(PyExc_ValueError,
                     "set_isa: isa must be 'auto', 'scalar', 'avx2', 'avxvnni', 'avx512' or 'amx', got %R", arg);
        return NULL;
    }
    if (dsv4_set_isa(isa)) {
        PyErr_Format(PyExc_ValueError, "set_isa: this CPU does not support %s", s);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *get_isa(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(dsv4_isa_name(dsv4_get_isa()));
}

/* for the tests: reads of the ISA or thread setting made by threads of a parallel region
 * outside the call's snapshot (dsv4_unpinned_reads) since the module was loaded */
static PyObject *unpinned_reads(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(dsv4_unpinned_reads());
}

static PyObject *available_isas(PyObject *self, PyObject *unused)
{
    PyObject *l = PyList_New(0), *t = NULL;
    for (int i = DSV4_ISA_SCALAR; l && i <= DSV4_ISA_AMX; i++) {
        PyObject *name = dsv4_isa_supported((enum dsv4_isa)i)
                             ? PyUnicode_FromString(dsv4_isa_name((enum dsv4_isa)i)) : NULL;
        if (name && PyList_Append(l, name) < 0)
            Py_CLEAR(l);
        Py_XDECREF(name);
    }
    if (l)
        t = PyList_AsTuple(l);
    Py_XDECREF(l);
    return t;
}

static PyMethodDef module_methods[] = {
    {"kernel_table", kernel_table, METH_NOARGS, "Every kernel's arguments, as the binding checks them."},
    {"set_num_threads", set_num_threads, METH_O, "Threads the kernels use (results do not depend on it)."},
    {"get_num_threads", get_num_threads, METH_NOARGS, "Threads the kernels use."},
    {"set_isa", set_isa, METH_O, "'auto', 'scalar', 'avx2', 'avx512' or 'amx': the code path of the hot loops."},
    {"get_isa", get_isa, METH_NOARGS, "The code path in use."},
    {"available_isas", available_isas, METH_NOARGS, "The code paths this CPU can run."},
    {"_unpinned_reads", unpinned_reads, METH_NOARGS,
     "Internal, for tests: reads of the code path or thread count made inside a parallel "
     "region without the call's snapshot (0 unless a kernel re-reads a setting mid-call)."},
    {NULL, NULL, 0, NULL}};

static PyMethodDef kernel_defs[NKERNELS];

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "dsv4._C", "dsv4 C kernels; use the wrappers in dsv4.", -1,
    module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    if (init_dtypes())
        return NULL;
    /* the binding's fixed-size arrays must hold every row of the table */
    for (int i = 0; i < NKERNELS; i++) {
        int na = 0, nd = 0, ns = 0;
        while (kernels[i].args[na].name)
            na++;
        while (kernels[i].dims[nd].name)
            nd++;
        while (kernels[i].scalars[ns].name)
            ns++;
        if (na > MAXARGS || ns > MAXARGS || nd > MAXDIMS) {
            PyErr_Format(PyExc_SystemError, "dsv4._C: kernel table row '%s' is too large",
                         kernels[i].name);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    for (int i = 0; i < NKERNELS; i++) {
        kernel_defs[i] = (PyMethodDef){kernels[i].name, (PyCFunction)(void (*)(void))call_kernel,
                                       METH_FASTCALL | METH_KEYWORDS, kernels[i].doc};
        PyObject *idx = PyLong_FromLong(i);
        PyObject *f = idx ? PyCFunction_NewEx(&kernel_defs[i], idx, m) : NULL;
        Py_XDECREF(idx);
        if (!f || PyModule_AddObject(m, kernels[i].name, f)) {
            Py_XDECREF(f);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
