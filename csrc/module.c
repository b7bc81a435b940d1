/* dsv4._C: the only file that touches the CPython and NumPy C-APIs.
 *
 * One table row per kernel names its tensors (dtype, symbolic dims, role),
 * its scalars and its dims, each with the offset of its field in the kernel's
 * argument struct. call_kernel() is the whole binding: it validates every
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

#define RMS(f) offsetof(struct dsv4_rms_norm_args, f)
static const struct dim_spec rms_dims[] = {{"T", RMS(T)}, {"D", RMS(D)}, {0}};
static const struct arg_spec rms_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, RMS(x)},
    {"norm_w", DSV4_BF16, "D", IN, 0, RMS(norm_w)},
    {"x_normed", DSV4_BF16, "T,D", OUT, 0, RMS(x_normed)},
    {0}};
static const struct scalar_spec rms_scalars[] = {{"rms_norm_eps", SC_FLOAT, RMS(rms_norm_eps), 1, 0, 0.0}, {0}};

#define QKV(f) offsetof(struct dsv4_qkv_proj_rope_args, f)
static const struct dim_spec qkv_dims[] = {
    {"B", QKV(B)}, {"S", QKV(S)}, {"T", QKV(T)}, {"D", QKV(D)}, {"Q", QKV(Q)},
    {"HHD", QKV(HHD)}, {"HD", QKV(HD)}, {"H", QKV(H)}, {"P", QKV(P)}, {"RW", QKV(RW)}, {0}};
#define QKV_WEIGHTS                                                              \
    {"wq_a", DSV4_BF16, "D,Q", IN, 0, QKV(wq_a)},                                \
    {"wq_b", DSV4_I8, "Q,HHD", IN, 0, QKV(wq_b)},                                \
    {"wq_b_scale", DSV4_F32, "HHD", IN, FLAT, QKV(wq_b_scale)},                  \
    {"wkv", DSV4_BF16, "D,HD", IN, 0, QKV(wkv)}
#define QKV_TAIL                                                                 \
    {"gamma_cq", DSV4_BF16, "Q", IN, 0, QKV(gamma_cq)},                          \
    {"gamma_ckv", DSV4_BF16, "HD", IN, 0, QKV(gamma_ckv)},                       \
    {"q", DSV4_BF16, "T,H,HD", OUT, 0, QKV(q)},                                  \
    {"kv", DSV4_BF16, "T,HD", OUT, 0, QKV(kv)},                                  \
    {"qr", DSV4_I8, "T,Q", OUT, 0, QKV(qr)},                                     \
    {"qr_scale", DSV4_F32, "T,1", OUT, 0, QKV(qr_scale)},                        \
    {0}
static const struct arg_spec qkv_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, QKV(x)},
    QKV_WEIGHTS,
    {"rope_cos", DSV4_BF16, "T,RW", IN, 0, QKV(rope_cos)},
    {"rope_sin", DSV4_BF16, "T,RW", IN, 0, QKV(rope_sin)},
    QKV_TAIL};
static const struct arg_spec decode_qkv_args[] = {
    {"x", DSV4_BF16, "B,S,D", IN, 0, QKV(x)},
    {"norm_w", DSV4_F32, "D", IN, 0, QKV(norm_w)},
    QKV_WEIGHTS,
    {"rope_cos", DSV4_BF16, "T,RW", IN, 0, QKV(rope_cos)},
    {"rope_sin", DSV4_BF16, "T,RW", IN, 0, QKV(rope_sin)},
    {"even_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    {"odd_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    QKV_TAIL};
static const struct arg_spec prefill_qkv_args[] = {
    {"x", DSV4_BF16, "B,S,D", IN, 0, QKV(x)},
    {"norm_w", DSV4_F32, "D", IN, 0, QKV(norm_w)},
    QKV_WEIGHTS,
    {"freqs_cos", DSV4_BF16, "P,RW", IN, 0, QKV(rope_cos)},
    {"freqs_sin", DSV4_BF16, "P,RW", IN, 0, QKV(rope_sin)},
    {"even_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    {"odd_select_t", DSV4_BF16, "_,_", UNUSED, OPTIONAL, 0},
    QKV_TAIL};
static const struct scalar_spec qkv_scalars[] = {
    {"rms_norm_eps", SC_FLOAT, QKV(rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, QKV(qk_rope_head_dim), 1, 0, 0.0},
    {0}};
static const struct scalar_spec prefill_qkv_scalars[] = {
    {"start_pos", SC_INT, QKV(start_pos), 0, 1, 0.0},
    {"rms_norm_eps", SC_FLOAT, QKV(rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, QKV(qk_rope_head_dim), 1, 0, 0.0},
    {0}};

#define HCP(f) offsetof(struct dsv4_hc_pre_args, f)
static const struct dim_spec hc_pre_dims[] = {
    {"T", HCP(T)}, {"HC", HCP(HC)}, {"D", HCP(D)}, {"MIX", HCP(MIX)}, {"K", HCP(K)},
    {"HC2", HCP(HC2)}, {0}};
static const struct arg_spec hc_pre_args[] = {
    {"x", DSV4_BF16, "T,HC,D", IN, 0, HCP(x)},
    {"hc_fn", DSV4_F32, "MIX,K", IN, 0, HCP(hc_fn)},
    {"hc_scale", DSV4_F32, "3", IN, 0, HCP(hc_scale)},
    {"hc_base", DSV4_F32, "MIX", IN, 0, HCP(hc_base)},
    {"x_mixed", DSV4_BF16, "T,D", OUT, 0, HCP(x_mixed)},
    {"post", DSV4_F32, "T,HC", OUT, 0, HCP(post)},
    {"comb", DSV4_F32, "T,HC2", OUT, 0, HCP(comb)},
    {0}};
static const struct scalar_spec hc_pre_scalars[] = {
    {"rms_norm_eps", SC_FLOAT, HCP(rms_norm_eps), 1, 0, 0.0},
    {"hc_eps", SC_FLOAT, HCP(hc_eps), 1, 0, 0.0},
    {"hc_sinkhorn_iters", SC_INT, HCP(hc_sinkhorn_iters), 1, 0, 0.0},
    {0}};

#define HCO(f) offsetof(struct dsv4_hc_post_args, f)
static const struct dim_spec hc_post_dims[] = {
    {"T", HCO(T)}, {"HC", HCO(HC)}, {"D", HCO(D)}, {"HC2", HCO(HC2)}, {0}};
static const struct arg_spec hc_post_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, HCO(x)},
    {"residual", DSV4_BF16, "T,HC,D", IN, 0, HCO(residual)},
    {"post", DSV4_F32, "T,HC", IN, 0, HCO(post)},
    {"comb", DSV4_F32, "T,HC2", IN, 0, HCO(comb)},
    {"y", DSV4_BF16, "T,HC,D", OUT, 0, HCO(y)},
    {0}};

#define HCH(f) offsetof(struct dsv4_hc_head_args, f)
static const struct dim_spec hc_head_dims[] = {
    {"T", HCH(T)}, {"HC", HCH(HC)}, {"D", HCH(D)}, {"K", HCH(K)}, {0}};
static const struct arg_spec hc_head_args[] = {
    {"x_hc", DSV4_BF16, "T,HC,D", IN, 0, HCH(x_hc)},
    {"hc_head_fn", DSV4_F32, "HC,K", IN, 0, HCH(hc_head_fn)},
    {"hc_head_scale", DSV4_F32, "1", IN, 0, HCH(hc_head_scale)},
    {"hc_head_base", DSV4_F32, "HC", IN, 0, HCH(hc_head_base)},
    {"y", DSV4_BF16, "T,D", OUT, 0, HCH(y)},
    {0}};
static const struct scalar_spec hc_head_scalars[] = {
    {"rms_norm_eps", SC_FLOAT, HCH(rms_norm_eps), 1, 0, 0.0},
    {"hc_eps", SC_FLOAT, HCH(hc_eps), 1, 0, 0.0},
    {0}};

#define GATE(f) offsetof(struct dsv4_gate_args, f)
static const struct dim_spec gate_dims[] = {
    {"T", GATE(T)}, {"D", GATE(D)}, {"E", GATE(E)}, {"V", GATE(V)}, {"K", GATE(K)}, {0}};
static const struct arg_spec gate_args[] = {
    {"x_mixed", DSV4_BF16, "T,D", IN, 0, GATE(x_mixed)},
    {"norm_w", DSV4_BF16, "D", IN, 0, GATE(norm_w)},
    {"gate_w", DSV4_F32, "E,D", IN, 0, GATE(gate_w)},
    {"gate_bias", DSV4_F32, "E", IN, 0, GATE(gate_bias)},
    {"tid2eid", DSV4_I32, "V,K", IN, 0, GATE(tid2eid)},
    {"input_ids", DSV4_I64, "T", IN, 0, GATE(input_ids)},
    {"x_norm", DSV4_BF16, "T,D", OUT, 0, GATE(x_norm)},
    {"x_norm_i8", DSV4_I8, "T,D", OUT, 0, GATE(x_norm_i8)},
    {"x_norm_scale", DSV4_F32, "T,1", OUT, 0, GATE(x_norm_scale)},
    {"indices", DSV4_I32, "T,K", OUT, 0, GATE(indices)},
    {"weights", DSV4_F32, "T,K", OUT, 0, GATE(weights)},
    {0}};
static const struct scalar_spec gate_scalars[] = {
    {"layer_id", SC_INT, GATE(layer_id), 0, 0, 0.0},
    {"num_tokens", SC_INT, GATE(num_tokens), 0, ALL_ROWS, 0.0},
    {"rms_norm_eps", SC_FLOAT, GATE(rms_norm_eps), 1, 0, 0.0},
    {"num_hash_layers", SC_INT, GATE(num_hash_layers), 1, 0, 0.0},
    {"num_experts_per_tok", SC_INT, GATE(num_experts_per_tok), 1, 0, 0.0},
    {"routed_scaling_factor", SC_FLOAT, GATE(routed_scaling_factor), 1, 0, 0.0},
    {0}};

#define SHX(f) offsetof(struct dsv4_expert_shared_args, f)
static const struct dim_spec shx_dims[] = {{"T", SHX(T)}, {"D", SHX(D)}, {"I", SHX(IE)}, {0}};
static const struct arg_spec shx_args[] = {
    {"x_local_i8", DSV4_I8, "T,D", IN, 0, SHX(x_local_i8)},
    {"x_local_scale_dq", DSV4_F32, "T,1", IN, 0, SHX(x_local_scale_dq)},
    {"shared_w1", DSV4_I8, "I,D", IN, 0, SHX(shared_w1)},
    {"shared_w1_scale", DSV4_F32, "I", IN, 0, SHX(shared_w1_scale)},
    {"shared_w3", DSV4_I8, "I,D", IN, 0, SHX(shared_w3)},
    {"shared_w3_scale", DSV4_F32, "I", IN, 0, SHX(shared_w3_scale)},
    {"shared_w2", DSV4_I8, "D,I", IN, 0, SHX(shared_w2)},
    {"shared_w2_scale", DSV4_F32, "D", IN, 0, SHX(shared_w2_scale)},
    {"sh", DSV4_BF16, "T,D", OUT, 0, SHX(sh)},
    {0}};
static const struct scalar_spec shx_scalars[] = {
    {"swiglu_limit", SC_FLOAT, SHX(swiglu_limit), 1, 0, 0.0}, {0}};

#define RTX(f) offsetof(struct dsv4_expert_routed_args, f)
static const struct dim_spec rtx_dims[] = {
    {"E", RTX(E)}, {"M", RTX(M)}, {"D", RTX(D)}, {"I", RTX(IE)}, {0}};
static const struct arg_spec rtx_args[] = {
    {"recv_x", DSV4_I8, "E,M,D", IN, 0, RTX(recv_x)},
    {"recv_scale_dq", DSV4_F32, "E,M", IN, 0, RTX(recv_scale_dq)},
    {"recv_weights", DSV4_F32, "E,M", IN, 0, RTX(recv_weights)},
    {"recv_expert_count", DSV4_I32, "E,1", IN, 0, RTX(recv_expert_count)},
    {"routed_w1", DSV4_I8, "E,I,D", IN, 0, RTX(routed_w1)},
    {"routed_w1_scale", DSV4_F32, "E,I", IN, 0, RTX(routed_w1_scale)},
    {"routed_w3", DSV4_I8, "E,I,D", IN, 0, RTX(routed_w3)},
    {"routed_w3_scale", DSV4_F32, "E,I", IN, 0, RTX(routed_w3_scale)},
    {"routed_w2", DSV4_I8, "E,D,I", IN, 0, RTX(routed_w2)},
    {"routed_w2_scale", DSV4_F32, "E,D", IN, 0, RTX(routed_w2_scale)},
    {"recv_y", DSV4_BF16, "E,M,D", OUT, 0, RTX(recv_y)},
    {0}};
static const struct scalar_spec rtx_scalars[] = {
    {"swiglu_limit", SC_FLOAT, RTX(swiglu_limit), 1, 0, 0.0}, {0}};

#define MOE(f) offsetof(struct dsv4_moe_args, f)
static const struct dim_spec moe_dims[] = {
    {"R", MOE(R)}, {"T", MOE(T)}, {"HC", MOE(HC)}, {"D", MOE(D)}, {"MIX", MOE(MIX)},
    {"HCD", MOE(HCD)}, {"E", MOE(E)}, {"V", MOE(V)}, {"K", MOE(K)}, {"EL", MOE(EL)},
    {"I", MOE(IE)}, {0}};
static const struct arg_spec moe_args[] = {
    {"x_hc", DSV4_BF16, "R,T,HC,D", IN, 0, MOE(x_hc)},
    {"hc_ffn_fn", DSV4_F32, "R,MIX,HCD", IN, 0, MOE(hc_ffn_fn)},
    {"hc_ffn_scale", DSV4_F32, "R,3", IN, 0, MOE(hc_ffn_scale)},
    {"hc_ffn_base", DSV4_F32, "R,MIX", IN, 0, MOE(hc_ffn_base)},
    {"norm_w", DSV4_BF16, "R,D", IN, 0, MOE(norm_w)},
    {"gate_w", DSV4_F32, "R,E,D", IN, 0, MOE(gate_w)},
    {"gate_bias", DSV4_F32, "R,E", IN, 0, MOE(gate_bias)},
    {"tid2eid", DSV4_I32, "R,V,K", IN, 0, MOE(tid2eid)},
    {"input_ids", DSV4_I64, "R,T", IN, 0, MOE(input_ids)},
    {"routed_w1", DSV4_I8, "R,EL,I,D", IN, 0, MOE(routed_w1)},
    {"routed_w1_scale", DSV4_F32, "R,EL,I", IN, 0, MOE(routed_w1_scale)},
    {"routed_w3", DSV4_I8, "R,EL,I,D", IN, 0, MOE(routed_w3)},
    {"routed_w3_scale", DSV4_F32, "R,EL,I", IN, 0, MOE(routed_w3_scale)},
    {"routed_w2", DSV4_I8, "R,EL,D,I", IN, 0, MOE(routed_w2)},
    {"routed_w2_scale", DSV4_F32, "R,EL,D", IN, 0, MOE(routed_w2_scale)},
    {"shared_w1", DSV4_I8, "R,I,D", IN, 0, MOE(shared_w1)},
    {"shared_w1_scale", DSV4_F32, "R,I", IN, 0, MOE(shared_w1_scale)},
    {"shared_w3", DSV4_I8, "R,I,D", IN, 0, MOE(shared_w3)},
    {"shared_w3_scale", DSV4_F32, "R,I", IN, 0, MOE(shared_w3_scale)},
    {"shared_w2", DSV4_I8, "R,D,I", IN, 0, MOE(shared_w2)},
    {"shared_w2_scale", DSV4_F32, "R,D", IN, 0, MOE(shared_w2_scale)},
    {"x_next", DSV4_BF16, "R,T,HC,D", OUT, 0, MOE(x_next)},
    {0}};
static const struct scalar_spec moe_scalars[] = {
    {"layer_id", SC_INT, MOE(layer_id), 0, 0, 0.0},
    {"num_tokens", SC_INT, MOE(num_tokens), 0, ALL_ROWS, 0.0},
    {"rms_norm_eps", SC_FLOAT, MOE(rms_norm_eps), 1, 0, 0.0},
    {"hc_eps", SC_FLOAT, MOE(hc_eps), 1, 0, 0.0},
    {"hc_sinkhorn_iters", SC_INT, MOE(hc_sinkhorn_iters), 1, 0, 0.0},
    {"num_hash_layers", SC_INT, MOE(num_hash_layers), 1, 0, 0.0},
    {"num_experts_per_tok", SC_INT, MOE(num_experts_per_tok), 1, 0, 0.0},
    {"routed_scaling_factor", SC_FLOAT, MOE(routed_scaling_factor), 1, 0, 0.0},
    {"swiglu_limit", SC_FLOAT, MOE(swiglu_limit), 1, 0, 0.0},
    {0}};

#define ATT(f) offsetof(struct dsv4_sparse_attn_args, f)
static const struct dim_spec attn_dims[] = {
    {"T", ATT(T)}, {"H", ATT(H)}, {"HD", ATT(HD)}, {"OB", ATT(OB)}, {"BLOCK", ATT(BLOCK)},
    {"OM", ATT(OM)}, {"B", ATT(B)}, {"CB", ATT(CB)}, {"CM", ATT(CM)}, {"K", ATT(K)},
    {"RW", ATT(RW)}, {"G", ATT(G)}, {"OL", ATT(OL)}, {"OGI", ATT(OGI)}, {"D", ATT(D)},
    {"GOL", ATT(GOL)}, {0}};
#define ATTN_TAIL                                                                  \
    {"attn_sink", DSV4_F32, "H", IN, 0, ATT(attn_sink)},                           \
    {"freqs_cos", DSV4_BF16, "T,RW", IN, 0, ATT(freqs_cos)},                       \
    {"freqs_sin", DSV4_BF16, "T,RW", IN, 0, ATT(freqs_sin)},                       \
    {"wo_a", DSV4_BF16, "G,OL,OGI", IN, 0, ATT(wo_a)},                             \
    {"wo_b", DSV4_I8, "D,GOL", IN, 0, ATT(wo_b)},                                  \
    {"wo_b_scale", DSV4_F32, "D", IN, 0, ATT(wo_b_scale)}
static const struct arg_spec prefill_attn_args[] = {
    {"q", DSV4_BF16, "T,H,HD", IN, 0, ATT(q)},
    {"ori_kv", DSV4_BF16, "OB,BLOCK,1,HD", IN, 0, ATT(ori_kv)},
    {"ori_block_table", DSV4_I32, "OM", IN, 0, ATT(ori_block_table)},
    {"kv_overlay", DSV4_BF16, "T,HD", IN, 0, ATT(kv_overlay)},
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", IN, 0, ATT(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "CM", IN, 0, ATT(cmp_block_table)},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, ATT(cmp_sparse_indices)},
    {"cmp_sparse_lens", DSV4_I32, "T", IN, 0, ATT(cmp_sparse_lens)},
    ATTN_TAIL,
    {"attn_out", DSV4_BF16, "T,D", OUT, 0, ATT(attn_out)},
    {0}};
#define DECODE_HEAD                                                                \
    {"q", DSV4_BF16, "T,H,HD", IN, 0, ATT(q)},                                     \
    {"ori_kv", DSV4_BF16, "OB,BLOCK,1,HD", IN, 0, ATT(ori_kv)},                    \
    {"ori_block_table", DSV4_I32, "B,OM", IN, 0, ATT(ori_block_table)},            \
    {"mtp_kv_overlay", DSV4_BF16, "T,HD", IN, 0, ATT(kv_overlay)}
static const struct arg_spec decode_attn_args[] = {
    DECODE_HEAD,
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", IN, 0, ATT(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "B,CM", IN, 0, ATT(cmp_block_table)},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, ATT(cmp_sparse_indices)},
    {"valid_block_mask", DSV4_I32, "T,_", UNUSED, OPTIONAL, 0},
    ATTN_TAIL,
    {"attn_out", DSV4_BF16, "T,D", OUT, 0, ATT(attn_out)},
    {0}};
static const struct arg_spec hca_attn_args[] = {
    DECODE_HEAD,
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", IN, 0, ATT(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "B,CM", IN, 0, ATT(cmp_block_table)},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, ATT(cmp_sparse_indices)},
    ATTN_TAIL,
    {"attn_out", DSV4_BF16, "T,D", OUT, 0, ATT(attn_out)},
    {0}};
static const struct arg_spec swa_attn_args[] = {
    DECODE_HEAD,
    {"cmp_kv", DSV4_BF16, "_,_,_,_", UNUSED, OPTIONAL, 0},
    {"cmp_block_table", DSV4_I32, "_,_", UNUSED, OPTIONAL, 0},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, ATT(cmp_sparse_indices)},
    {"win_bias", DSV4_F32, "T,_", UNUSED, OPTIONAL, 0},
    ATTN_TAIL,
    {"attn_out", DSV4_BF16, "T,D", OUT, 0, ATT(attn_out)},
    {0}};
static const struct scalar_spec prefill_attn_scalars[] = {
    {"num_tokens", SC_INT, ATT(num_tokens), 0, ALL_ROWS, 0.0},
    {"sliding_window", SC_INT, ATT(sliding_window), 1, 0, 0.0},
    {"index_topk", SC_INT, ATT(index_topk), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, ATT(qk_rope_head_dim), 1, 0, 0.0},
    {0}};
static const struct scalar_spec decode_attn_scalars[] = {
    {"sliding_window", SC_INT, ATT(sliding_window), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, ATT(qk_rope_head_dim), 1, 0, 0.0},
    {0}};

#define DCP(f) offsetof(struct dsv4_decode_compressor_args, f)
static const struct dim_spec dcp_dims[] = {
    {"B", DCP(B)}, {"S", DCP(S)}, {"D", DCP(D)}, {"HD", DCP(HD)}, {"OD", DCP(OD)},
    {"NB", DCP(NB)}, {"PAGE", DCP(PAGE)}, {"SW", DCP(SW)}, {"NP", DCP(NP)}, {"R", DCP(R)},
    {"R2", DCP(R2)}, {"NC", DCP(NC)}, {"CBLK", DCP(CBLK)}, {0}};
static const struct arg_spec dcp_args[] = {
    {"x", DSV4_BF16, "B,S,D", IN, 0, DCP(x)},
    {"kv", DSV4_F32, "B,S,HD", OUT, 0, DCP(kv)},
    {"compress_state", DSV4_F32, "NB,PAGE,SW", INOUT, 0, DCP(compress_state)},
    {"compress_state_block_table", DSV4_I32, "B,NP", IN, 0, DCP(compress_state_block_table)},
    {"wkv", DSV4_BF16, "OD,D", IN, 0, DCP(wkv)},
    {"wgate", DSV4_BF16, "OD,D", IN, 0, DCP(wgate)},
    {"ape", DSV4_F32, "R,OD", IN, 0, DCP(ape)},
    {"norm_w", DSV4_BF16, "HD", IN, 0, DCP(norm_w)},
    {"cos", DSV4_F32, "B,R2", IN, 0, DCP(cos)},
    {"sin", DSV4_F32, "B,R2", IN, 0, DCP(sin)},
    {"cmp_kv_cache", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, DCP(cmp_kv_cache)},
    {"position_ids", DSV4_I32, "B,S", IN, 0, DCP(position_ids)},
    {"cmp_slot_mapping", DSV4_I64, "B,S", IN, 0, DCP(cmp_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "B,S", IN, 0, DCP(state_slot_mapping)},
    {0}};
static const struct scalar_spec dcp_scalars[] = {
    {"rms_norm_eps", SC_FLOAT, DCP(rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, DCP(qk_rope_head_dim), 1, 0, 0.0},
    {0}};

#define PCP(f) offsetof(struct dsv4_prefill_compressor_args, f)
static const struct dim_spec pcp_dims[] = {
    {"T", PCP(T)}, {"D", PCP(D)}, {"OD", PCP(OD)}, {"HD", PCP(HD)}, {"NB", PCP(NB)},
    {"PAGE", PCP(PAGE)}, {"NP", PCP(NP)}, {"R", PCP(R)}, {"MAXS", PCP(MAXS)}, {"RW", PCP(RW)},
    {"NC", PCP(NC)}, {"CBLK", PCP(CBLK)}, {0}};
static const struct arg_spec pcp_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, PCP(x)},
    {"kv_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PCP(kv_state)},
    {"score_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PCP(score_state)},
    {"compress_state_block_table", DSV4_I32, "NP", IN, 0, PCP(compress_state_block_table)},
    {"wkv", DSV4_BF16, "OD,D", IN, 0, PCP(wkv)},
    {"wgate", DSV4_BF16, "OD,D", IN, 0, PCP(wgate)},
    {"ape", DSV4_F32, "R,OD", IN, 0, PCP(ape)},
    {"norm_w", DSV4_BF16, "HD", IN, 0, PCP(norm_w)},
    {"freqs_cos", DSV4_BF16, "MAXS,RW", IN, 0, PCP(freqs_cos)},
    {"freqs_sin", DSV4_BF16, "MAXS,RW", IN, 0, PCP(freqs_sin)},
    {"cmp_kv", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, PCP(cmp_kv)},
    {"position_ids", DSV4_I32, "T", IN, 0, PCP(position_ids)},
    {"cmp_slot_mapping", DSV4_I64, "T", IN, 0, PCP(cmp_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "T", IN, 0, PCP(state_slot_mapping)},
    {0}};
static const struct scalar_spec pcp_scalars[] = {
    {"num_tokens", SC_INT, PCP(num_tokens), 0, ALL_ROWS, 0.0},
    {"rms_norm_eps", SC_FLOAT, PCP(rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, PCP(qk_rope_head_dim), 1, 0, 0.0},
    {0}};

static const struct arg_spec dic_args[] = {
    {"x", DSV4_BF16, "B,S,D", IN, 0, DCP(x)},
    {"kv", DSV4_F32, "B,S,HD", OUT, 0, DCP(kv)},
    {"compress_state", DSV4_F32, "NB,PAGE,SW", INOUT, 0, DCP(compress_state)},
    {"compress_state_block_table", DSV4_I32, "B,NP", IN, 0, DCP(compress_state_block_table)},
    {"wkv", DSV4_BF16, "OD,D", IN, 0, DCP(wkv)},
    {"wgate", DSV4_BF16, "OD,D", IN, 0, DCP(wgate)},
    {"ape", DSV4_F32, "R,OD", IN, 0, DCP(ape)},
    {"norm_w", DSV4_BF16, "HD", IN, 0, DCP(norm_w)},
    {"cos", DSV4_F32, "B,R2", IN, 0, DCP(cos)},
    {"sin", DSV4_F32, "B,R2", IN, 0, DCP(sin)},
    {"hadamard", DSV4_BF16, "HD,HD", IN, 0, DCP(hadamard)},
    {"idx_kv_cache", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, DCP(cmp_kv_cache)},
    {"position_ids", DSV4_I32, "B,S", IN, 0, DCP(position_ids)},
    {"idx_slot_mapping", DSV4_I64, "B,S", IN, 0, DCP(cmp_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "B,S", IN, 0, DCP(state_slot_mapping)},
    {0}};
static const struct dim_spec pic_dims[] = {
    {"T", PCP(T)}, {"D", PCP(D)}, {"OD", PCP(OD)}, {"HD", PCP(HD)}, {"NB", PCP(NB)},
    {"PAGE", PCP(PAGE)}, {"NP", PCP(NP)}, {"R", PCP(R)}, {"MAXS", PCP(MAXS)}, {"RW", PCP(RW)},
    {"NC", PCP(NC)}, {"CBLK", PCP(CBLK)}, {"W", PCP(W)}, {0}};
static const struct arg_spec pic_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, PCP(x)},
    {"kv", DSV4_BF16, "W,HD", OUT, 0, PCP(kv_out)},
    {"kv_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PCP(kv_state)},
    {"score_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PCP(score_state)},
    {"inner_compress_state_block_table", DSV4_I32, "NP", IN, 0, PCP(compress_state_block_table)},
    {"wkv", DSV4_BF16, "OD,D", IN, 0, PCP(wkv)},
    {"wgate", DSV4_BF16, "OD,D", IN, 0, PCP(wgate)},
    {"ape", DSV4_F32, "R,OD", IN, 0, PCP(ape)},
    {"norm_w", DSV4_BF16, "HD", IN, 0, PCP(norm_w)},
    {"freqs_cos", DSV4_BF16, "MAXS,RW", IN, 0, PCP(freqs_cos)},
    {"freqs_sin", DSV4_BF16, "MAXS,RW", IN, 0, PCP(freqs_sin)},
    {"hadamard", DSV4_BF16, "HD,HD", IN, 0, PCP(hadamard)},
    {"idx_kv_cache", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, PCP(cmp_kv)},
    {"idx_block_table", DSV4_I32, "_", UNUSED, 0, 0},
    {"position_ids", DSV4_I32, "T", IN, 0, PCP(position_ids)},
    {"idx_slot_mapping", DSV4_I64, "T", IN, 0, PCP(cmp_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "T", IN, 0, PCP(state_slot_mapping)},
    {0}};

#define DIX(f) offsetof(struct dsv4_decode_indexer_args, f)
static const struct dim_spec dix_dims[] = {
    {"B", DIX(c.B)}, {"S", DIX(c.S)}, {"D", DIX(c.D)}, {"HD", DIX(c.HD)}, {"OD", DIX(c.OD)},
    {"NB", DIX(c.NB)}, {"PAGE", DIX(c.PAGE)}, {"SW", DIX(c.SW)}, {"NP", DIX(c.NP)},
    {"R", DIX(c.R)}, {"R2", DIX(c.R2)}, {"NC", DIX(c.NC)}, {"CBLK", DIX(c.CBLK)},
    {"N", DIX(q.N)}, {"QL", DIX(q.QL)}, {"HHD", DIX(q.HHD)}, {"H", DIX(q.H)},
    {"NBT", DIX(q.NBT)}, {"SL", DIX(q.SL)}, {0}};
static const struct arg_spec dix_args[] = {
    {"x", DSV4_BF16, "B,S,D", IN, 0, DIX(c.x)},
    {"qr", DSV4_I8, "N,QL", IN, 0, DIX(q.qr)},
    {"qr_scale", DSV4_F32, "N,1", IN, 0, DIX(q.qr_scale)},
    {"wq_b", DSV4_I8, "QL,HHD", IN, 0, DIX(q.wq_b)},
    {"wq_b_scale", DSV4_F32, "HHD", IN, 0, DIX(q.wq_b_scale)},
    {"weights_proj", DSV4_BF16, "D,H", IN, 0, DIX(q.weights_proj)},
    {"cos", DSV4_F32, "B,R2", IN, 0, DIX(c.cos)},
    {"sin", DSV4_F32, "B,R2", IN, 0, DIX(c.sin)},
    {"hadamard", DSV4_BF16, "HD,HD", IN, 0, DIX(c.hadamard)},
    {"inner_kv", DSV4_F32, "B,S,HD", INOUT, 0, DIX(c.kv)},
    {"inner_compress_state", DSV4_F32, "NB,PAGE,SW", INOUT, 0, DIX(c.compress_state)},
    {"inner_compress_state_block_table", DSV4_I32, "B,NP", IN, 0, DIX(c.compress_state_block_table)},
    {"inner_wkv", DSV4_BF16, "OD,D", IN, 0, DIX(c.wkv)},
    {"inner_wgate", DSV4_BF16, "OD,D", IN, 0, DIX(c.wgate)},
    {"inner_ape", DSV4_F32, "R,OD", IN, 0, DIX(c.ape)},
    {"inner_norm_w", DSV4_BF16, "HD", IN, 0, DIX(c.norm_w)},
    {"idx_kv_cache", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, DIX(c.cmp_kv_cache)},
    {"idx_block_table", DSV4_I32, "B,NBT", IN, 0, DIX(q.idx_block_table)},
    {"score", DSV4_F32, "B,S,SL", OUT, 0, DIX(q.score)},
    {"topk_idxs", DSV4_I32, "B,S,SL", OUT, 0, DIX(q.topk_idxs)},
    {"position_ids", DSV4_I32, "B,S", IN, 0, DIX(c.position_ids)},
    {"idx_slot_mapping", DSV4_I64, "B,S", IN, 0, DIX(c.cmp_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "B,S", IN, 0, DIX(c.state_slot_mapping)},
    {"kv_seq_lens", DSV4_I32, "B", IN, 0, DIX(q.kv_seq_lens)},
    {0}};
static const struct scalar_spec dix_scalars[] = {
    {"offset", SC_INT, DIX(q.offset), 0, 1, 128.0},
    {"rms_norm_eps", SC_FLOAT, DIX(c.rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, DIX(c.qk_rope_head_dim), 1, 0, 0.0},
    {"index_topk", SC_INT, DIX(q.index_topk), 1, 0, 0.0},
    {"index_n_heads", SC_INT, DIX(q.index_n_heads), 1, 0, 0.0},
    {"index_head_dim", SC_INT, DIX(q.index_head_dim), 1, 0, 0.0},
    {"index_weights_scale", SC_FLOAT, DIX(q.index_weights_scale), 1, 0, 0.0},
    {"max_position_embeddings", SC_INT, DIX(q.max_position_embeddings), 1, 0, 0.0},
    {0}};

#define PIX(f) offsetof(struct dsv4_prefill_indexer_args, f)
static const struct dim_spec pix_dims[] = {
    {"T", PIX(c.T)}, {"D", PIX(c.D)}, {"OD", PIX(c.OD)}, {"HD", PIX(c.HD)}, {"NB", PIX(c.NB)},
    {"PAGE", PIX(c.PAGE)}, {"NP", PIX(c.NP)}, {"R", PIX(c.R)}, {"MAXS", PIX(c.MAXS)},
    {"RW", PIX(c.RW)}, {"NC", PIX(c.NC)}, {"CBLK", PIX(c.CBLK)},
    {"N", PIX(q.N)}, {"QL", PIX(q.QL)}, {"HHD", PIX(q.HHD)}, {"H", PIX(q.H)},
    {"R2", PIX(q.R2q)}, {"NBT", PIX(q.NBT)}, {"SL", PIX(q.SL)}, {0}};
static const struct arg_spec pix_args[] = {
    {"x", DSV4_BF16, "T,D", IN, 0, PIX(c.x)},
    {"qr", DSV4_I8, "N,QL", IN, 0, PIX(q.qr)},
    {"qr_scale", DSV4_F32, "N,1", IN, 0, PIX(q.qr_scale)},
    {"wq_b", DSV4_I8, "QL,HHD", IN, 0, PIX(q.wq_b)},
    {"wq_b_scale", DSV4_F32, "HHD", IN, 0, PIX(q.wq_b_scale)},
    {"weights_proj", DSV4_BF16, "D,H", IN, 0, PIX(q.weights_proj)},
    {"cos", DSV4_F32, "N,R2", IN, 0, PIX(q.cos)},
    {"sin", DSV4_F32, "N,R2", IN, 0, PIX(q.sin)},
    {"freqs_cos", DSV4_BF16, "MAXS,RW", IN, 0, PIX(c.freqs_cos)},
    {"freqs_sin", DSV4_BF16, "MAXS,RW", IN, 0, PIX(c.freqs_sin)},
    {"hadamard", DSV4_BF16, "HD,HD", IN, 0, PIX(c.hadamard)},
    {"inner_kv_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PIX(c.kv_state)},
    {"inner_score_state", DSV4_F32, "NB,PAGE,OD", INOUT, 0, PIX(c.score_state)},
    {"inner_compress_state_block_table", DSV4_I32, "NP", IN, 0, PIX(c.compress_state_block_table)},
    {"inner_wkv", DSV4_BF16, "OD,D", IN, 0, PIX(c.wkv)},
    {"inner_wgate", DSV4_BF16, "OD,D", IN, 0, PIX(c.wgate)},
    {"inner_ape", DSV4_F32, "R,OD", IN, 0, PIX(c.ape)},
    {"inner_norm_w", DSV4_BF16, "HD", IN, 0, PIX(c.norm_w)},
    {"idx_kv_cache", DSV4_BF16, "NC,CBLK,1,HD", INOUT, 0, PIX(c.cmp_kv)},
    {"idx_block_table", DSV4_I32, "NBT", IN, 0, PIX(q.idx_block_table)},
    {"score", DSV4_F32, "T,SL", OUT, 0, PIX(q.score)},
    {"topk_idxs", DSV4_I32, "T,SL", OUT, 0, PIX(q.topk_idxs)},
    {"position_ids", DSV4_I32, "T", IN, 0, PIX(c.position_ids)},
    {"idx_slot_mapping", DSV4_I64, "T", IN, 0, PIX(c.cmp_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "T", IN, 0, PIX(c.state_slot_mapping)},
    {0}};
static const struct scalar_spec pix_scalars[] = {
    {"num_tokens", SC_INT, PIX(c.num_tokens), 0, ALL_ROWS, 0.0},
    {"rms_norm_eps", SC_FLOAT, PIX(c.rms_norm_eps), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, PIX(c.qk_rope_head_dim), 1, 0, 0.0},
    {"index_topk", SC_INT, PIX(q.index_topk), 1, 0, 0.0},
    {"index_n_heads", SC_INT, PIX(q.index_n_heads), 1, 0, 0.0},
    {"index_head_dim", SC_INT, PIX(q.index_head_dim), 1, 0, 0.0},
    {"index_weights_scale", SC_FLOAT, PIX(q.index_weights_scale), 1, 0, 0.0},
    {"sliding_window", SC_INT, PIX(q.sliding_window), 1, 0, 0.0},
    {0}};

#define BLK(f) offsetof(struct dsv4_attention_block_args, f)
static const struct dim_spec block_dims[] = {
    {"T", BLK(T)}, {"HC", BLK(HC)}, {"D", BLK(D)}, {"MIX", BLK(MIX)}, {"HCD", BLK(HCD)},
    {"HC2", BLK(HC2)}, {"Q", BLK(Q)}, {"HHD", BLK(HHD)}, {"HD", BLK(HD)}, {"H", BLK(H)},
    {"MAXS", BLK(MAXS)}, {"RW", BLK(RW)}, {"COD", BLK(COD)}, {"CR", BLK(CR)}, {"CNB", BLK(CNB)},
    {"CPAGE", BLK(CPAGE)}, {"CSW", BLK(CSW)}, {"CNP", BLK(CNP)}, {"IHHD", BLK(IHHD)},
    {"IH", BLK(IH)}, {"IHD", BLK(IHD)}, {"IOD", BLK(IOD)}, {"IR", BLK(IR)}, {"INB", BLK(INB)},
    {"IPAGE", BLK(IPAGE)}, {"ISW", BLK(ISW)}, {"INP", BLK(INP)}, {"ISL", BLK(ISL)},
    {"OB", BLK(OB)}, {"BLOCK", BLK(BLOCK)}, {"B", BLK(B)}, {"OM", BLK(OM)}, {"CB", BLK(CB)},
    {"CM", BLK(CM)}, {"NI", BLK(NI)}, {"NBT", BLK(NBT)}, {"K", BLK(K)}, {"G", BLK(G)},
    {"OL", BLK(OL)}, {"OGI", BLK(OGI)}, {"GOL", BLK(GOL)}, {0}};
#define BLOCK_FRONT                                                                  \
    {"x_hc", DSV4_BF16, "T,HC,D", IN, 0, BLK(x_hc)},                                 \
    {"hc_attn_fn", DSV4_F32, "MIX,HCD", IN, 0, BLK(hc_attn_fn)},                     \
    {"hc_attn_scale", DSV4_F32, "3", IN, 0, BLK(hc_attn_scale)},                     \
    {"hc_attn_base", DSV4_F32, "MIX", IN, 0, BLK(hc_attn_base)},                     \
    {"attn_norm_w", DSV4_BF16, "D", IN, 0, BLK(attn_norm_w)},                        \
    {"wq_a", DSV4_BF16, "D,Q", IN, 0, BLK(wq_a)},                                    \
    {"wq_b", DSV4_I8, "Q,HHD", IN, 0, BLK(wq_b)},                                    \
    {"wq_b_scale", DSV4_F32, "HHD", IN, FLAT, BLK(wq_b_scale)},                      \
    {"wkv", DSV4_BF16, "D,HD", IN, 0, BLK(wkv)},                                     \
    {"gamma_cq", DSV4_BF16, "Q", IN, 0, BLK(gamma_cq)},                              \
    {"gamma_ckv", DSV4_BF16, "HD", IN, 0, BLK(gamma_ckv)},                           \
    {"freqs_cos", DSV4_BF16, "MAXS,RW", IN, 0, BLK(freqs_cos)},                      \
    {"freqs_sin", DSV4_BF16, "MAXS,RW", IN, 0, BLK(freqs_sin)}
#define BLOCK_CMP_WEIGHTS                                                            \
    {"cmp_wkv", DSV4_BF16, "COD,D", IN, 0, BLK(cmp_wkv)},                            \
    {"cmp_wgate", DSV4_BF16, "COD,D", IN, 0, BLK(cmp_wgate)},                        \
    {"cmp_ape", DSV4_F32, "CR,COD", IN, 0, BLK(cmp_ape)},                            \
    {"cmp_norm_w", DSV4_BF16, "HD", IN, 0, BLK(cmp_norm_w)}
#define BLOCK_INNER_WEIGHTS                                                          \
    {"inner_wkv", DSV4_BF16, "IOD,D", IN, 0, BLK(inner_wkv)},                        \
    {"inner_wgate", DSV4_BF16, "IOD,D", IN, 0, BLK(inner_wgate)},                    \
    {"inner_ape", DSV4_F32, "IR,IOD", IN, 0, BLK(inner_ape)},                        \
    {"inner_norm_w", DSV4_BF16, "IHD", IN, 0, BLK(inner_norm_w)}
#define BLOCK_OPROJ                                                                  \
    {"attn_sink", DSV4_F32, "H", IN, 0, BLK(attn_sink)},                             \
    {"wo_a", DSV4_BF16, "G,OL,OGI", IN, 0, BLK(wo_a)},                               \
    {"wo_b", DSV4_I8, "D,GOL", IN, 0, BLK(wo_b)},                                    \
    {"wo_b_scale", DSV4_F32, "D", IN, 0, BLK(wo_b_scale)}
#define BLOCK_STAGES_FRONT                                                           \
    {"x_out", DSV4_BF16, "T,HC,D", OUT, 0, BLK(x_out)},                              \
    {"x_mixed", DSV4_BF16, "T,D", STAGE, 0, BLK(x_mixed)},                           \
    {"post", DSV4_F32, "T,HC", STAGE, 0, BLK(post)},                                 \
    {"comb", DSV4_F32, "T,HC2", STAGE, 0, BLK(comb)},                                \
    {"x_normed", DSV4_BF16, "T,D", STAGE, 0, BLK(x_normed)},                         \
    {"q", DSV4_BF16, "T,H,HD", STAGE, 0, BLK(q)},                                    \
    {"kv", DSV4_BF16, "T,HD", STAGE, 0, BLK(kv)},                                    \
    {"qr", DSV4_I8, "T,Q", STAGE, 0, BLK(qr)},                                       \
    {"qr_scale", DSV4_F32, "T,1", STAGE, 0, BLK(qr_scale)}
#define STAGE_ATTN_OUT {"attn_out", DSV4_BF16, "T,D", STAGE, 0, BLK(attn_out)}
#define STAGE_CMP_KV {"compressed_kv", DSV4_F32, "B,1,HD", STAGE, 0, BLK(compressed_kv)}
#define STAGE_INDICES {"sparse_indices", DSV4_I32, "T,K", STAGE, 0, BLK(sparse_indices)}

static const struct arg_spec dswa_args[] = {
    BLOCK_FRONT,
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"block_table", DSV4_I32, "B,OM", IN, 0, BLK(ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    BLOCK_OPROJ,
    {"cmp_kv", DSV4_BF16, "_,_,_,_", UNUSED, OPTIONAL, 0},
    {"cmp_block_table", DSV4_I32, "_,_", UNUSED, OPTIONAL, 0},
    BLOCK_STAGES_FRONT, STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec dhca_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    {"compress_state", DSV4_F32, "CNB,CPAGE,CSW", INOUT, 0, BLK(compress_state)},
    {"compress_state_block_table", DSV4_I32, "B,CNP", IN, 0, BLK(compress_state_block_table)},
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"ori_block_table", DSV4_I32, "B,OM", IN, 0, BLK(ori_block_table)},
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", INOUT, 0, BLK(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "B,CM", IN, 0, BLK(cmp_block_table)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"cmp_slot_mapping", DSV4_I64, "T", IN, 0, BLK(cmp_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(state_slot_mapping)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    {"kv_seq_lens", DSV4_I32, "B", IN, 0, BLK(kv_seq_lens)},
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_CMP_KV, STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec dcsa_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    {"compress_state", DSV4_F32, "CNB,CPAGE,CSW", INOUT, 0, BLK(compress_state)},
    {"compress_state_block_table", DSV4_I32, "B,CNP", IN, 0, BLK(compress_state_block_table)},
    {"idx_wq_b", DSV4_I8, "Q,IHHD", IN, 0, BLK(idx_wq_b)},
    {"idx_wq_b_scale", DSV4_F32, "IHHD", IN, 0, BLK(idx_wq_b_scale)},
    {"weights_proj", DSV4_BF16, "D,IH", IN, 0, BLK(weights_proj)},
    {"hadamard_idx", DSV4_BF16, "IHD,IHD", IN, 0, BLK(hadamard_idx)},
    BLOCK_INNER_WEIGHTS,
    {"inner_compress_state", DSV4_F32, "INB,IPAGE,ISW", INOUT, 0, BLK(inner_compress_state)},
    {"inner_compress_state_block_table", DSV4_I32, "B,INP", IN, 0,
     BLK(inner_compress_state_block_table)},
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"ori_block_table", DSV4_I32, "B,OM", IN, 0, BLK(ori_block_table)},
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", INOUT, 0, BLK(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "B,CM", IN, 0, BLK(cmp_block_table)},
    {"idx_kv_cache", DSV4_BF16, "NI,BLOCK,1,IHD", INOUT, 0, BLK(idx_kv_cache)},
    {"idx_block_table", DSV4_I32, "B,NBT", IN, 0, BLK(idx_block_table)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"cmp_slot_mapping", DSV4_I64, "T", IN, 0, BLK(cmp_slot_mapping)},
    {"idx_slot_mapping", DSV4_I64, "T", IN, 0, BLK(idx_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(state_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(inner_state_slot_mapping)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    {"kv_seq_lens", DSV4_I32, "B", IN, 0, BLK(kv_seq_lens)},
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_CMP_KV,
    {"topk_idxs", DSV4_I32, "B,1,ISL", STAGE, 0, BLK(topk_idxs)},
    STAGE_INDICES, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec pswa_args[] = {
    BLOCK_FRONT,
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"block_table", DSV4_I32, "OM", IN, 0, BLK(ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, BLK(cmp_sparse_indices)},
    {"cmp_sparse_lens", DSV4_I32, "T", IN, 0, BLK(cmp_sparse_lens)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec phca_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    {"cmp_kv_state", DSV4_F32, "CNB,CPAGE,COD", INOUT, 0, BLK(cmp_kv_state)},
    {"cmp_score_state", DSV4_F32, "CNB,CPAGE,COD", INOUT, 0, BLK(cmp_score_state)},
    {"compress_state_block_table", DSV4_I32, "CNP", IN, 0, BLK(compress_state_block_table)},
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"ori_block_table", DSV4_I32, "OM", IN, 0, BLK(ori_block_table)},
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", INOUT, 0, BLK(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "CM", IN, 0, BLK(cmp_block_table)},
    {"cmp_sparse_indices", DSV4_I32, "T,K", IN, 0, BLK(cmp_sparse_indices)},
    {"cmp_sparse_lens", DSV4_I32, "T", IN, 0, BLK(cmp_sparse_lens)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    {"cmp_slot_mapping", DSV4_I64, "T", IN, 0, BLK(cmp_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(state_slot_mapping)},
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT, STAGE_ATTN_OUT,
    {0}};
static const struct arg_spec pcsa_args[] = {
    BLOCK_FRONT, BLOCK_CMP_WEIGHTS,
    {"cmp_kv_state", DSV4_F32, "CNB,CPAGE,COD", INOUT, 0, BLK(cmp_kv_state)},
    {"cmp_score_state", DSV4_F32, "CNB,CPAGE,COD", INOUT, 0, BLK(cmp_score_state)},
    {"compress_state_block_table", DSV4_I32, "CNP", IN, 0, BLK(compress_state_block_table)},
    {"hadamard_idx", DSV4_BF16, "IHD,IHD", IN, 0, BLK(hadamard_idx)},
    {"idx_wq_b", DSV4_I8, "Q,IHHD", IN, 0, BLK(idx_wq_b)},
    {"idx_wq_b_scale", DSV4_F32, "IHHD", IN, 0, BLK(idx_wq_b_scale)},
    {"idx_weights_proj", DSV4_BF16, "D,IH", IN, 0, BLK(weights_proj)},
    BLOCK_INNER_WEIGHTS,
    {"inner_kv_state", DSV4_F32, "INB,IPAGE,IOD", INOUT, 0, BLK(inner_kv_state)},
    {"inner_score_state", DSV4_F32, "INB,IPAGE,IOD", INOUT, 0, BLK(inner_score_state)},
    {"inner_compress_state_block_table", DSV4_I32, "INP", IN, 0,
     BLK(inner_compress_state_block_table)},
    {"kv_cache", DSV4_BF16, "OB,BLOCK,1,HD", INOUT, 0, BLK(kv_cache)},
    {"ori_block_table", DSV4_I32, "OM", IN, 0, BLK(ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "T", IN, 0, BLK(ori_slot_mapping)},
    {"cmp_kv", DSV4_BF16, "CB,BLOCK,1,HD", INOUT, 0, BLK(cmp_kv)},
    {"cmp_block_table", DSV4_I32, "CM", IN, 0, BLK(cmp_block_table)},
    {"idx_kv_cache", DSV4_BF16, "NI,BLOCK,1,IHD", INOUT, 0, BLK(idx_kv_cache)},
    {"idx_block_table", DSV4_I32, "NBT", IN, 0, BLK(idx_block_table)},
    {"position_ids", DSV4_I32, "T", IN, 0, BLK(position_ids)},
    {"cmp_slot_mapping", DSV4_I64, "T", IN, 0, BLK(cmp_slot_mapping)},
    {"idx_slot_mapping", DSV4_I64, "T", IN, 0, BLK(idx_slot_mapping)},
    {"state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(state_slot_mapping)},
    {"inner_state_slot_mapping", DSV4_I64, "T", IN, 0, BLK(inner_state_slot_mapping)},
    BLOCK_OPROJ,
    BLOCK_STAGES_FRONT,
    {"topk_idxs", DSV4_I32, "T,ISL", STAGE, 0, BLK(topk_idxs)},
    STAGE_INDICES,
    {"sparse_lens", DSV4_I32, "T", STAGE, 0, BLK(sparse_lens)},
    STAGE_ATTN_OUT,
    {0}};
#define BLOCK_SCALARS                                                                      \
    {"sliding_window", SC_INT, BLK(sliding_window), 1, 0, 0.0},                            \
    {"qk_rope_head_dim", SC_INT, BLK(qk_rope_head_dim), 1, 0, 0.0},                        \
    {"index_topk", SC_INT, BLK(index_topk), 1, 0, 0.0},                                    \
    {"index_n_heads", SC_INT, BLK(index_n_heads), 1, 0, 0.0},                              \
    {"index_head_dim", SC_INT, BLK(index_head_dim), 1, 0, 0.0},                            \
    {"max_position_embeddings", SC_INT, BLK(max_position_embeddings), 1, 0, 0.0},          \
    {"hc_sinkhorn_iters", SC_INT, BLK(hc_sinkhorn_iters), 1, 0, 0.0},                      \
    {"rms_norm_eps", SC_FLOAT, BLK(rms_norm_eps), 1, 0, 0.0},                              \
    {"hc_eps", SC_FLOAT, BLK(hc_eps), 1, 0, 0.0},                                          \
    {"index_weights_scale", SC_FLOAT, BLK(index_weights_scale), 1, 0, 0.0}
static const struct scalar_spec decode_block_scalars[] = {BLOCK_SCALARS, {0}};
static const struct scalar_spec prefill_block_scalars[] = {
    {"num_tokens", SC_INT, BLK(num_tokens), 0, ALL_ROWS, 0.0}, BLOCK_SCALARS, {0}};

#define LAY(f) offsetof(struct dsv4_layer_args, f)
static const struct dim_spec layer_dims[] = {
    {"R", LAY(R)}, {"NREQ", LAY(NREQ)},
    {"T", LAY(blk.T)}, {"HC", LAY(blk.HC)}, {"D", LAY(blk.D)}, {"MIX", LAY(blk.MIX)},
    {"HCD", LAY(blk.HCD)}, {"Q", LAY(blk.Q)}, {"HHD", LAY(blk.HHD)}, {"HD", LAY(blk.HD)},
    {"H", LAY(blk.H)}, {"MAXS", LAY(blk.MAXS)}, {"RW", LAY(blk.RW)}, {"IHHD", LAY(blk.IHHD)},
    {"IH", LAY(blk.IH)}, {"IHD", LAY(blk.IHD)}, {"IOD", LAY(blk.IOD)}, {"IR", LAY(blk.IR)},
    {"INB", LAY(blk.INB)}, {"IPAGE", LAY(blk.IPAGE)}, {"ISW", LAY(blk.ISW)}, {"INP", LAY(blk.INP)},
    {"OB", LAY(blk.OB)}, {"BLOCK", LAY(blk.BLOCK)}, {"B", LAY(blk.B)}, {"OM", LAY(blk.OM)},
    {"CB", LAY(blk.CB)}, {"CM", LAY(blk.CM)}, {"NI", LAY(blk.NI)}, {"NBT", LAY(blk.NBT)},
    {"K", LAY(blk.K)}, {"G", LAY(blk.G)}, {"OL", LAY(blk.OL)}, {"OGI", LAY(blk.OGI)},
    {"GOL", LAY(blk.GOL)},
    {"HOD", LAY(hca.OD)}, {"HR", LAY(hca.R)}, {"HNB", LAY(hca.NB)}, {"HPAGE", LAY(hca.PAGE)},
    {"HSW", LAY(hca.SW)}, {"HNP", LAY(hca.NP)},
    {"COD", LAY(csa.OD)}, {"CR", LAY(csa.R)}, {"CNB", LAY(csa.NB)}, {"CPAGE", LAY(csa.PAGE)},
    {"CSW", LAY(csa.SW)}, {"CNP", LAY(csa.NP)},
    {"E", LAY(moe.E)}, {"V", LAY(moe.V)}, {"TOPK", LAY(moe.K)}, {"EL", LAY(moe.EL)},
    {"I", LAY(moe.IE)}, {"HC2", LAY(blk.HC2)}, {0}};
#define LAYER_FRONT                                                                  \
    {"hc_attn_fn", DSV4_F32, "R,MIX,HCD", IN, 0, LAY(blk.hc_attn_fn)},               \
    {"hc_attn_scale", DSV4_F32, "R,3", IN, 0, LAY(blk.hc_attn_scale)},               \
    {"hc_attn_base", DSV4_F32, "R,MIX", IN, 0, LAY(blk.hc_attn_base)},               \
    {"attn_norm_w", DSV4_BF16, "R,D", IN, 0, LAY(blk.attn_norm_w)},                  \
    {"wq_a", DSV4_BF16, "R,D,Q", IN, 0, LAY(blk.wq_a)},                              \
    {"wq_b", DSV4_I8, "R,Q,HHD", IN, 0, LAY(blk.wq_b)},                              \
    {"wq_b_scale", DSV4_F32, "R,HHD", IN, 0, LAY(blk.wq_b_scale)},                   \
    {"wkv", DSV4_BF16, "R,D,HD", IN, 0, LAY(blk.wkv)},                               \
    {"gamma_cq", DSV4_BF16, "R,Q", IN, 0, LAY(blk.gamma_cq)},                        \
    {"gamma_ckv", DSV4_BF16, "R,HD", IN, 0, LAY(blk.gamma_ckv)},                     \
    {"freqs_cos", DSV4_BF16, "R,MAXS,RW", IN, 0, LAY(blk.freqs_cos)},                \
    {"freqs_sin", DSV4_BF16, "R,MAXS,RW", IN, 0, LAY(blk.freqs_sin)}
#define LAYER_OPROJ                                                                  \
    {"attn_sink", DSV4_F32, "R,H", IN, 0, LAY(blk.attn_sink)},                       \
    {"wo_a", DSV4_BF16, "R,G,OL,OGI", IN, 0, LAY(blk.wo_a)},                         \
    {"wo_b", DSV4_I8, "R,D,GOL", IN, 0, LAY(blk.wo_b)},                              \
    {"wo_b_scale", DSV4_F32, "R,D", IN, 0, LAY(blk.wo_b_scale)}
#define LAYER_CMP(P, X, OD, RR, NB, PAGE, W)                                         \
    {P "cmp_wkv", DSV4_BF16, "R," OD ",D", IN, 0, LAY(X.wkv)},                        \
    {P "cmp_wgate", DSV4_BF16, "R," OD ",D", IN, 0, LAY(X.wgate)},                    \
    {P "cmp_ape", DSV4_F32, "R," RR "," OD, IN, 0, LAY(X.ape)},                       \
    {P "cmp_norm_w", DSV4_BF16, "R,HD", IN, 0, LAY(X.norm_w)}
#define LAYER_CSA_INDEXER(WP)                                                        \
    {"csa_idx_wq_b", DSV4_I8, "R,Q,IHHD", IN, 0, LAY(blk.idx_wq_b)},                 \
    {"csa_idx_wq_b_scale", DSV4_F32, "R,IHHD", IN, 0, LAY(blk.idx_wq_b_scale)},      \
    {"csa_weights_proj", DSV4_BF16, "R,D,IH", IN, 0, LAY(blk.weights_proj)}
#define LAYER_INNER                                                                  \
    {"csa_inner_wkv", DSV4_BF16, "R,IOD,D", IN, 0, LAY(blk.inner_wkv)},              \
    {"csa_inner_wgate", DSV4_BF16, "R,IOD,D", IN, 0, LAY(blk.inner_wgate)},          \
    {"csa_inner_ape", DSV4_F32, "R,IR,IOD", IN, 0, LAY(blk.inner_ape)},              \
    {"csa_inner_norm_w", DSV4_BF16, "R,IHD", IN, 0, LAY(blk.inner_norm_w)}
#define LAYER_MOE                                                                    \
    {"hc_ffn_fn", DSV4_F32, "R,MIX,HCD", IN, 0, LAY(moe.hc_ffn_fn)},                 \
    {"hc_ffn_scale", DSV4_F32, "R,3", IN, 0, LAY(moe.hc_ffn_scale)},                 \
    {"hc_ffn_base", DSV4_F32, "R,MIX", IN, 0, LAY(moe.hc_ffn_base)},                 \
    {"norm_w", DSV4_BF16, "R,D", IN, 0, LAY(moe.norm_w)},                            \
    {"gate_w", DSV4_F32, "R,E,D", IN, 0, LAY(moe.gate_w)},                           \
    {"gate_bias", DSV4_F32, "R,E", IN, 0, LAY(moe.gate_bias)},                       \
    {"tid2eid", DSV4_I32, "R,V,TOPK", IN, 0, LAY(moe.tid2eid)},                      \
    {"input_ids", DSV4_I64, "R,T", IN, 0, LAY(moe.input_ids)},                       \
    {"routed_w1", DSV4_I8, "R,EL,I,D", IN, 0, LAY(moe.routed_w1)},                   \
    {"routed_w1_scale", DSV4_F32, "R,EL,I", IN, 0, LAY(moe.routed_w1_scale)},        \
    {"routed_w3", DSV4_I8, "R,EL,I,D", IN, 0, LAY(moe.routed_w3)},                   \
    {"routed_w3_scale", DSV4_F32, "R,EL,I", IN, 0, LAY(moe.routed_w3_scale)},        \
    {"routed_w2", DSV4_I8, "R,EL,D,I", IN, 0, LAY(moe.routed_w2)},                   \
    {"routed_w2_scale", DSV4_F32, "R,EL,D", IN, 0, LAY(moe.routed_w2_scale)},        \
    {"shared_w1", DSV4_I8, "R,I,D", IN, 0, LAY(moe.shared_w1)},                      \
    {"shared_w1_scale", DSV4_F32, "R,I", IN, 0, LAY(moe.shared_w1_scale)},           \
    {"shared_w3", DSV4_I8, "R,I,D", IN, 0, LAY(moe.shared_w3)},                      \
    {"shared_w3_scale", DSV4_F32, "R,I", IN, 0, LAY(moe.shared_w3_scale)},           \
    {"shared_w2", DSV4_I8, "R,D,I", IN, 0, LAY(moe.shared_w2)},                      \
    {"shared_w2_scale", DSV4_F32, "R,D", IN, 0, LAY(moe.shared_w2_scale)},           \
    {"x_next", DSV4_BF16, "R,T,HC,D", OUT, 0, LAY(moe.x_next)},                      \
    {"x_mixed", DSV4_BF16, "R,T,D", STAGE, 0, LAY(st.x_mixed)},                      \
    {"post", DSV4_F32, "R,T,HC", STAGE, 0, LAY(st.post)},                            \
    {"comb", DSV4_F32, "R,T,HC2", STAGE, 0, LAY(st.comb)},                           \
    {"x_normed", DSV4_BF16, "R,T,D", STAGE, 0, LAY(st.x_normed)},                    \
    {"q", DSV4_BF16, "R,T,H,HD", STAGE, 0, LAY(st.q)},                               \
    {"kv", DSV4_BF16, "R,T,HD", STAGE, 0, LAY(st.kv)},                               \
    {"qr", DSV4_I8, "R,T,Q", STAGE, 0, LAY(st.qr)},                                  \
    {"qr_scale", DSV4_F32, "R,T,1", STAGE, 0, LAY(st.qr_scale)},                     \
    {"attn_out", DSV4_BF16, "R,T,D", STAGE, 0, LAY(st.attn_out)},                    \
    {"x_attn", DSV4_BF16, "R,T,HC,D", STAGE, 0, LAY(x_attn)}

static const struct arg_spec dlayer_args[] = {
    {"x_hc", DSV4_BF16, "R,T,HC,D", IN, 0, LAY(blk.x_hc)},
    LAYER_FRONT,
    {"kv_cache", DSV4_BF16, "R,OB,BLOCK,1,HD", INOUT, 0, LAY(blk.kv_cache)},
    {"block_table", DSV4_I32, "R,B,OM", IN, 0, LAY(blk.ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.ori_slot_mapping)},
    {"hca_cmp_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(hca.cmp_slot_mapping)},
    {"hca_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(hca.state_slot_mapping)},
    {"csa_cmp_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(csa.cmp_slot_mapping)},
    {"csa_idx_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.idx_slot_mapping)},
    {"csa_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(csa.state_slot_mapping)},
    {"csa_inner_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.inner_state_slot_mapping)},
    {"position_ids", DSV4_I32, "R,T", IN, 0, LAY(blk.position_ids)},
    {"kv_seq_lens", DSV4_I32, "R,B", IN, 0, LAY(blk.kv_seq_lens)},
    LAYER_OPROJ,
    LAYER_CMP("hca_", hca, "HOD", "HR", "HNB", "HPAGE", "HSW"),
    {"hca_compress_state", DSV4_F32, "R,HNB,HPAGE,HSW", INOUT, 0, LAY(hca.state)},
    {"hca_compress_state_block_table", DSV4_I32, "R,B,HNP", IN, 0, LAY(hca.table)},
    LAYER_CMP("csa_", csa, "COD", "CR", "CNB", "CPAGE", "CSW"),
    {"csa_compress_state", DSV4_F32, "R,CNB,CPAGE,CSW", INOUT, 0, LAY(csa.state)},
    {"csa_compress_state_block_table", DSV4_I32, "R,B,CNP", IN, 0, LAY(csa.table)},
    LAYER_CSA_INDEXER(0),
    {"csa_hadamard_idx", DSV4_BF16, "R,IHD,IHD", IN, 0, LAY(blk.hadamard_idx)},
    LAYER_INNER,
    {"csa_inner_compress_state", DSV4_F32, "R,INB,IPAGE,ISW", INOUT, 0, LAY(blk.inner_compress_state)},
    {"csa_inner_compress_state_block_table", DSV4_I32, "R,B,INP", IN, 0,
     LAY(blk.inner_compress_state_block_table)},
    {"cmp_kv", DSV4_BF16, "R,CB,BLOCK,1,HD", INOUT, 0, LAY(blk.cmp_kv)},
    {"cmp_block_table", DSV4_I32, "R,B,CM", IN, 0, LAY(blk.cmp_block_table)},
    {"idx_kv_cache", DSV4_BF16, "R,NI,BLOCK,1,IHD", INOUT, 0, LAY(blk.idx_kv_cache)},
    {"idx_block_table", DSV4_I32, "R,B,NBT", IN, 0, LAY(blk.idx_block_table)},
    LAYER_MOE,
    {0}};
static const struct arg_spec player_args[] = {
    {"x_hc", DSV4_BF16, "R,T,HC,D", IN, 0, LAY(blk.x_hc)},
    {"seq_lens", DSV4_I32, "R,NREQ", IN, 0, LAY(seq_lens)},
    {"chunk_lens", DSV4_I32, "R,NREQ", IN, 0, LAY(chunk_lens)},
    {"chunk_offsets", DSV4_I32, "R,NREQ", IN, 0, LAY(chunk_offsets)},
    {"chunk_tile_offsets", DSV4_I32, "R,NREQ", IN, 0, LAY(chunk_tile_offsets)},
    LAYER_FRONT,
    LAYER_CMP("hca_", hca, "HOD", "HR", "HNB", "HPAGE", "HSW"),
    {"hca_cmp_kv_state", DSV4_F32, "R,HNB,HPAGE,HOD", INOUT, 0, LAY(hca.kv_state)},
    {"hca_cmp_score_state", DSV4_F32, "R,HNB,HPAGE,HOD", INOUT, 0, LAY(hca.score_state)},
    {"hca_compress_state_block_table", DSV4_I32, "R,HNP", IN, 0, LAY(hca.table)},
    LAYER_CMP("csa_", csa, "COD", "CR", "CNB", "CPAGE", "CSW"),
    {"csa_cmp_kv_state", DSV4_F32, "R,CNB,CPAGE,COD", INOUT, 0, LAY(csa.kv_state)},
    {"csa_cmp_score_state", DSV4_F32, "R,CNB,CPAGE,COD", INOUT, 0, LAY(csa.score_state)},
    {"csa_compress_state_block_table", DSV4_I32, "R,CNP", IN, 0, LAY(csa.table)},
    {"csa_hadamard_idx", DSV4_BF16, "R,IHD,IHD", IN, 0, LAY(blk.hadamard_idx)},
    LAYER_CSA_INDEXER(0),
    LAYER_INNER,
    {"csa_inner_kv_state", DSV4_F32, "R,INB,IPAGE,IOD", INOUT, 0, LAY(blk.inner_kv_state)},
    {"csa_inner_score_state", DSV4_F32, "R,INB,IPAGE,IOD", INOUT, 0, LAY(blk.inner_score_state)},
    {"csa_inner_compress_state_block_table", DSV4_I32, "R,INP", IN, 0,
     LAY(blk.inner_compress_state_block_table)},
    {"kv_cache", DSV4_BF16, "R,OB,BLOCK,1,HD", INOUT, 0, LAY(blk.kv_cache)},
    {"ori_block_table", DSV4_I32, "R,OM", IN, 0, LAY(blk.ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.ori_slot_mapping)},
    {"cmp_kv", DSV4_BF16, "R,CB,BLOCK,1,HD", INOUT, 0, LAY(blk.cmp_kv)},
    {"cmp_block_table", DSV4_I32, "R,CM", IN, 0, LAY(blk.cmp_block_table)},
    {"cmp_sparse_indices", DSV4_I32, "R,T,K", IN, 0, LAY(blk.cmp_sparse_indices)},
    {"cmp_sparse_lens", DSV4_I32, "R,T", IN, 0, LAY(blk.cmp_sparse_lens)},
    {"idx_kv_cache", DSV4_BF16, "R,NI,BLOCK,1,IHD", INOUT, 0, LAY(blk.idx_kv_cache)},
    {"idx_block_table", DSV4_I32, "R,NBT", IN, 0, LAY(blk.idx_block_table)},
    {"position_ids", DSV4_I32, "R,T", IN, 0, LAY(blk.position_ids)},
    {"hca_cmp_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(hca.cmp_slot_mapping)},
    {"hca_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(hca.state_slot_mapping)},
    {"csa_cmp_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(csa.cmp_slot_mapping)},
    {"csa_idx_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.idx_slot_mapping)},
    {"csa_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(csa.state_slot_mapping)},
    {"csa_inner_state_slot_mapping", DSV4_I64, "R,T", IN, 0, LAY(blk.inner_state_slot_mapping)},
    LAYER_OPROJ,
    LAYER_MOE,
    {0}};
#define LAYER_SCALARS                                                                      \
    {"layer_id", SC_INT, LAY(layer_id), 0, 0, 0.0},                                        \
    {"compress_ratio", SC_INT, LAY(compress_ratio), PER_LAYER, 0, 0.0},                    \
    {"num_hidden_layers", SC_INT, LAY(num_hidden_layers), 1, 0, 0.0},                      \
    {"sliding_window", SC_INT, LAY(blk.sliding_window), 1, 0, 0.0},                        \
    {"qk_rope_head_dim", SC_INT, LAY(blk.qk_rope_head_dim), 1, 0, 0.0},                    \
    {"index_topk", SC_INT, LAY(blk.index_topk), 1, 0, 0.0},                                \
    {"index_n_heads", SC_INT, LAY(blk.index_n_heads), 1, 0, 0.0},                          \
    {"index_head_dim", SC_INT, LAY(blk.index_head_dim), 1, 0, 0.0},                        \
    {"max_position_embeddings", SC_INT, LAY(blk.max_position_embeddings), 1, 0, 0.0},      \
    {"hc_sinkhorn_iters", SC_INT, LAY(blk.hc_sinkhorn_iters), 1, 0, 0.0},                  \
    {"rms_norm_eps", SC_FLOAT, LAY(blk.rms_norm_eps), 1, 0, 0.0},                          \
    {"hc_eps", SC_FLOAT, LAY(blk.hc_eps), 1, 0, 0.0},                                      \
    {"index_weights_scale", SC_FLOAT, LAY(blk.index_weights_scale), 1, 0, 0.0},            \
    {"num_hash_layers", SC_INT, LAY(moe.num_hash_layers), 1, 0, 0.0},                      \
    {"num_experts_per_tok", SC_INT, LAY(moe.num_experts_per_tok), 1, 0, 0.0},              \
    {"routed_scaling_factor", SC_FLOAT, LAY(moe.routed_scaling_factor), 1, 0, 0.0},        \
    {"swiglu_limit", SC_FLOAT, LAY(moe.swiglu_limit), 1, 0, 0.0}
static const struct scalar_spec layer_scalars[] = {LAYER_SCALARS, {0}};

#define MTP(f) offsetof(struct dsv4_mtp_projection_args, f)
static const struct dim_spec mtp_dims[] = {{"T", MTP(T)}, {"HC", MTP(HC)}, {"D", MTP(D)}, {0}};
static const struct arg_spec mtp_args[] = {
    {"hidden_states", DSV4_BF16, "T,D", IN, 0, MTP(hidden_states)},
    {"prev_hidden_states", DSV4_BF16, "T,HC,D", IN, 0, MTP(prev_hidden_states)},
    {"enorm_w", DSV4_F32, "D", IN, 0, MTP(enorm_w)},
    {"hnorm_w", DSV4_F32, "D", IN, 0, MTP(hnorm_w)},
    {"e_proj_w", DSV4_I8, "D,D", IN, 0, MTP(e_proj_w)},
    {"e_proj_w_scale", DSV4_F32, "D", IN, 0, MTP(e_proj_w_scale)},
    {"e_proj_smooth", DSV4_F32, "D", IN, 0, MTP(e_proj_smooth)},
    {"h_proj_w", DSV4_I8, "D,D", IN, 0, MTP(h_proj_w)},
    {"h_proj_w_scale", DSV4_F32, "D", IN, 0, MTP(h_proj_w_scale)},
    {"h_proj_smooth", DSV4_F32, "D", IN, 0, MTP(h_proj_smooth)},
    {"hidden_states_out", DSV4_BF16, "T,HC,D", OUT, 0, MTP(hidden_states_out)},
    {0}};
static const struct scalar_spec mtp_scalars[] = {
    {"rms_norm_eps", SC_FLOAT, MTP(rms_norm_eps), 1, 0, 0.0}, {0}};

#define LMH(f) offsetof(struct dsv4_lm_head_args, f)
static const struct dim_spec lm_head_dims[] = {
    {"R", LMH(R)}, {"T", LMH(T)}, {"D", LMH(D)}, {"P", LMH(P)}, {"VS", LMH(VS)}, {"V", LMH(V)},
    {0}};
static const struct arg_spec lm_head_args[] = {
    {"hidden_states", DSV4_BF16, "R,T,D", IN, 0, LMH(hidden_states)},
    {"lm_head_weight", DSV4_BF16, "P,VS,D", IN, 0, LMH(lm_head_weight)},
    {"logits", DSV4_F32, "R,T,V", OUT, 0, LMH(logits)},
    {0}};

#define PMT(f) offsetof(struct dsv4_prefill_mtp_args, f)
static const struct dim_spec prefill_mtp_dims[] = {
    {"R", PMT(R)}, {"T", PMT(blk.T)}, {"HC", PMT(blk.HC)}, {"D", PMT(blk.D)},
    {"MIX", PMT(blk.MIX)}, {"HCD", PMT(blk.HCD)}, {"Q", PMT(blk.Q)}, {"HHD", PMT(blk.HHD)},
    {"HD", PMT(blk.HD)}, {"H", PMT(blk.H)}, {"MAXS", PMT(blk.MAXS)}, {"RW", PMT(blk.RW)},
    {"OB", PMT(blk.OB)}, {"BLOCK", PMT(blk.BLOCK)}, {"OM", PMT(blk.OM)}, {"K", PMT(blk.K)},
    {"G", PMT(blk.G)}, {"OL", PMT(blk.OL)}, {"OGI", PMT(blk.OGI)}, {"GOL", PMT(blk.GOL)},
    {"E", PMT(moe.E)}, {"V", PMT(moe.V)}, {"TOPK", PMT(moe.K)}, {"EL", PMT(moe.EL)},
    {"I", PMT(moe.IE)}, {0}};
static const struct arg_spec prefill_mtp_args[] = {
    {"hidden_states", DSV4_BF16, "R,T,D", IN, 0, PMT(proj.hidden_states)},
    {"prev_hidden_states", DSV4_BF16, "R,T,HC,D", IN, 0, PMT(proj.prev_hidden_states)},
    {"enorm_w", DSV4_F32, "R,D", IN, 0, PMT(proj.enorm_w)},
    {"hnorm_w", DSV4_F32, "R,D", IN, 0, PMT(proj.hnorm_w)},
    {"e_proj_w", DSV4_I8, "R,D,D", IN, 0, PMT(proj.e_proj_w)},
    {"e_proj_w_scale", DSV4_F32, "R,D", IN, 0, PMT(proj.e_proj_w_scale)},
    {"e_proj_smooth", DSV4_F32, "R,D", IN, 0, PMT(proj.e_proj_smooth)},
    {"h_proj_w", DSV4_I8, "R,D,D", IN, 0, PMT(proj.h_proj_w)},
    {"h_proj_w_scale", DSV4_F32, "R,D", IN, 0, PMT(proj.h_proj_w_scale)},
    {"h_proj_smooth", DSV4_F32, "R,D", IN, 0, PMT(proj.h_proj_smooth)},
    {"hc_attn_fn", DSV4_F32, "R,MIX,HCD", IN, 0, PMT(blk.hc_attn_fn)},
    {"hc_attn_scale", DSV4_F32, "R,3", IN, 0, PMT(blk.hc_attn_scale)},
    {"hc_attn_base", DSV4_F32, "R,MIX", IN, 0, PMT(blk.hc_attn_base)},
    {"attn_norm_w", DSV4_BF16, "R,D", IN, 0, PMT(blk.attn_norm_w)},
    {"wq_a", DSV4_BF16, "R,D,Q", IN, 0, PMT(blk.wq_a)},
    {"wq_b", DSV4_I8, "R,Q,HHD", IN, 0, PMT(blk.wq_b)},
    {"wq_b_scale", DSV4_F32, "R,HHD", IN, 0, PMT(blk.wq_b_scale)},
    {"wkv", DSV4_BF16, "R,D,HD", IN, 0, PMT(blk.wkv)},
    {"gamma_cq", DSV4_BF16, "R,Q", IN, 0, PMT(blk.gamma_cq)},
    {"gamma_ckv", DSV4_BF16, "R,HD", IN, 0, PMT(blk.gamma_ckv)},
    {"freqs_cos", DSV4_BF16, "R,MAXS,RW", IN, 0, PMT(blk.freqs_cos)},
    {"freqs_sin", DSV4_BF16, "R,MAXS,RW", IN, 0, PMT(blk.freqs_sin)},
    {"kv_cache", DSV4_BF16, "R,OB,BLOCK,1,HD", INOUT, 0, PMT(blk.kv_cache)},
    {"ori_block_table", DSV4_I32, "R,OM", IN, 0, PMT(blk.ori_block_table)},
    {"ori_slot_mapping", DSV4_I64, "R,T", IN, 0, PMT(blk.ori_slot_mapping)},
    {"cmp_sparse_indices", DSV4_I32, "R,T,K", IN, 0, PMT(blk.cmp_sparse_indices)},
    {"cmp_sparse_lens", DSV4_I32, "R,T", IN, 0, PMT(blk.cmp_sparse_lens)},
    {"position_ids", DSV4_I32, "R,T", IN, 0, PMT(blk.position_ids)},
    {"attn_sink", DSV4_F32, "R,H", IN, 0, PMT(blk.attn_sink)},
    {"wo_a", DSV4_BF16, "R,G,OL,OGI", IN, 0, PMT(blk.wo_a)},
    {"wo_b", DSV4_I8, "R,D,GOL", IN, 0, PMT(blk.wo_b)},
    {"wo_b_scale", DSV4_F32, "R,D", IN, 0, PMT(blk.wo_b_scale)},
    {"hc_ffn_fn", DSV4_F32, "R,MIX,HCD", IN, 0, PMT(moe.hc_ffn_fn)},
    {"hc_ffn_scale", DSV4_F32, "R,3", IN, 0, PMT(moe.hc_ffn_scale)},
    {"hc_ffn_base", DSV4_F32, "R,MIX", IN, 0, PMT(moe.hc_ffn_base)},
    {"norm_w", DSV4_BF16, "R,D", IN, 0, PMT(moe.norm_w)},
    {"gate_w", DSV4_F32, "R,E,D", IN, 0, PMT(moe.gate_w)},
    {"gate_bias", DSV4_F32, "R,E", IN, 0, PMT(moe.gate_bias)},
    {"tid2eid", DSV4_I32, "R,V,TOPK", IN, 0, PMT(moe.tid2eid)},
    {"input_ids", DSV4_I64, "R,T", IN, 0, PMT(moe.input_ids)},
    {"routed_w1", DSV4_I8, "R,EL,I,D", IN, 0, PMT(moe.routed_w1)},
    {"routed_w1_scale", DSV4_F32, "R,EL,I", IN, 0, PMT(moe.routed_w1_scale)},
    {"routed_w3", DSV4_I8, "R,EL,I,D", IN, 0, PMT(moe.routed_w3)},
    {"routed_w3_scale", DSV4_F32, "R,EL,I", IN, 0, PMT(moe.routed_w3_scale)},
    {"routed_w2", DSV4_I8, "R,EL,D,I", IN, 0, PMT(moe.routed_w2)},
    {"routed_w2_scale", DSV4_F32, "R,EL,D", IN, 0, PMT(moe.routed_w2_scale)},
    {"shared_w1", DSV4_I8, "R,I,D", IN, 0, PMT(moe.shared_w1)},
    {"shared_w1_scale", DSV4_F32, "R,I", IN, 0, PMT(moe.shared_w1_scale)},
    {"shared_w3", DSV4_I8, "R,I,D", IN, 0, PMT(moe.shared_w3)},
    {"shared_w3_scale", DSV4_F32, "R,I", IN, 0, PMT(moe.shared_w3_scale)},
    {"shared_w2", DSV4_I8, "R,D,I", IN, 0, PMT(moe.shared_w2)},
    {"shared_w2_scale", DSV4_F32, "R,D", IN, 0, PMT(moe.shared_w2_scale)},
    {"mtp_hc_head_fn", DSV4_F32, "R,HC,HCD", IN, 0, PMT(head.hc_head_fn)},
    {"mtp_hc_head_scale", DSV4_F32, "R,1", IN, 0, PMT(head.hc_head_scale)},
    {"mtp_hc_head_base", DSV4_F32, "R,HC", IN, 0, PMT(head.hc_head_base)},
    {"mtp_norm_w", DSV4_BF16, "R,D", IN, 0, PMT(mtp_norm_w)},
    {"hidden_out", DSV4_BF16, "R,T,D", OUT, 0, PMT(hidden_out)},
    {"pre_hc_hidden_out", DSV4_BF16, "R,T,HC,D", OUT, 0, PMT(moe.x_next)},
    {"projected", DSV4_BF16, "R,T,HC,D", STAGE, 0, PMT(projected)},
    {"x_attn", DSV4_BF16, "R,T,HC,D", STAGE, 0, PMT(x_attn)},
    {"x_head", DSV4_BF16, "R,T,D", STAGE, 0, PMT(x_head)},
    {0}};
static const struct scalar_spec prefill_mtp_scalars[] = {
    {"num_tokens", SC_INT, PMT(num_tokens), 0, ALL_ROWS, 0.0},
    {"num_hidden_layers", SC_INT, PMT(num_hidden_layers), 1, 0, 0.0},
    {"sliding_window", SC_INT, PMT(blk.sliding_window), 1, 0, 0.0},
    {"qk_rope_head_dim", SC_INT, PMT(blk.qk_rope_head_dim), 1, 0, 0.0},
    {"index_topk", SC_INT, PMT(blk.index_topk), 1, 0, 0.0},
    {"index_n_heads", SC_INT, PMT(blk.index_n_heads), 1, 0, 0.0},
    {"index_head_dim", SC_INT, PMT(blk.index_head_dim), 1, 0, 0.0},
    {"max_position_embeddings", SC_INT, PMT(blk.max_position_embeddings), 1, 0, 0.0},
    {"hc_sinkhorn_iters", SC_INT, PMT(blk.hc_sinkhorn_iters), 1, 0, 0.0},
    {"rms_norm_eps", SC_FLOAT, PMT(blk.rms_norm_eps), 1, 0, 0.0},
    {"hc_eps", SC_FLOAT, PMT(blk.hc_eps), 1, 0, 0.0},
    {"index_weights_scale", SC_FLOAT, PMT(blk.index_weights_scale), 1, 0, 0.0},
    {"num_hash_layers", SC_INT, PMT(moe.num_hash_layers), 1, 0, 0.0},
    {"num_experts_per_tok", SC_INT, PMT(moe.num_experts_per_tok), 1, 0, 0.0},
    {"routed_scaling_factor", SC_FLOAT, PMT(moe.routed_scaling_factor), 1, 0, 0.0},
    {"swiglu_limit", SC_FLOAT, PMT(moe.swiglu_limit), 1, 0, 0.0},
    {0}};

#define CAST(f) offsetof(struct dsv4_cast_args, f)
static const struct dim_spec cast_dims[] = {{"N", CAST(N)}, {0}};
static const struct arg_spec f32_bf16_args[] = {
    {"x", DSV4_F32, "N", IN, 0, CAST(x)}, {"y", DSV4_BF16, "N", OUT, 0, CAST(y)}, {0}};
static const struct arg_spec f32_fp8_args[] = {
    {"x", DSV4_F32, "N", IN, 0, CAST(x)}, {"y", DSV4_FP8, "N", OUT, 0, CAST(y)}, {0}};
static const struct arg_spec f32_f32_args[] = {
    {"x", DSV4_F32, "N", IN, 0, CAST(x)}, {"y", DSV4_F32, "N", OUT, 0, CAST(y)}, {0}};
static const struct arg_spec fp8_f32_args[] = {
    {"x", DSV4_FP8, "N", IN, 0, CAST(x)}, {"y", DSV4_F32, "N", OUT, 0, CAST(y)}, {0}};

#define QI8(f) offsetof(struct dsv4_quant_int8_args, f)
static const struct dim_spec qi8_dims[] = {{"M", QI8(M)}, {"N", QI8(N)}, {0}};
static const struct arg_spec qi8_args[] = {
    {"x", DSV4_F32, "M,N", IN, 0, QI8(x)},
    {"y", DSV4_I8, "M,N", OUT, 0, QI8(y)},
    {"scale", DSV4_F32, "M,1", OUT, 0, QI8(scale)},
    {0}};

#define MM(f) offsetof(struct dsv4_matmul_args, f)
static const struct dim_spec mm_dims[] = {{"M", MM(M)}, {"K", MM(K)}, {"N", MM(N)}, {0}};
static const struct arg_spec mm_bf16_args[] = {
    {"a", DSV4_BF16, "M,K", IN, 0, MM(a)},
    {"b", DSV4_BF16, "K,N", IN, 0, MM(b)},
    {"c", DSV4_F32, "M,N", OUT, 0, MM(c)},
    {0}};
static const struct arg_spec mm_i8_args[] = {
    {"a", DSV4_I8, "M,K", IN, 0, MM(a)},
    {"b", DSV4_I8, "K,N", IN, 0, MM(b)},
    {"c", DSV4_I32, "M,N", OUT, 0, MM(c)},
    {0}};
static const struct arg_spec mm_i8_nt_args[] = {
    {"a", DSV4_I8, "M,K", IN, 0, MM(a)},
    {"b", DSV4_I8, "N,K", IN, 0, MM(b)},
    {"c", DSV4_I32, "M,N", OUT, 0, MM(c)},
    {0}};

#define ROPE(f) offsetof(struct dsv4_rope_args, f)
static const struct dim_spec rope_dims[] = {{"M", ROPE(M)}, {"R", ROPE(R)}, {"RW", ROPE(RW)}, {0}};
static const struct arg_spec rope_args[] = {
    {"x", DSV4_F32, "M,R", IN, 0, ROPE(x)},
    {"cos", DSV4_BF16, "M,RW", IN, 0, ROPE(cos)},
    {"sin", DSV4_BF16, "M,RW", IN, 0, ROPE(sin)},
    {"y", DSV4_BF16, "M,R", OUT, 0, ROPE(y)},
    {0}};

static const struct scalar_spec no_scalars[] = {{0}};

#define ROW(NAME, DOC, INTERNAL, VAR, S, ARGS, SCALARS, DIMS, FN)                         \
    {NAME, DOC, INTERNAL, VAR, sizeof(struct S), offsetof(struct S, variant),            \
     offsetof(struct S, scratch), ARGS, SCALARS, DIMS, FN##_prepare, FN}

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
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *kn = PyTuple_GET_ITEM(kwnames, i);
        int found = 0;
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
    else if (!strcmp(s, "avx512"))
        isa = DSV4_ISA_AVX512;
    else if (!strcmp(s, "amx"))
        isa = DSV4_ISA_AMX;
    else if (!strcmp(s, "auto"))
        isa = dsv4_best_isa();
    else {
        PyErr_Format(PyExc_ValueError,
                     "set_isa: isa must be 'auto', 'scalar', 'avx2', 'avx512' or 'amx', got %R", arg);
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
