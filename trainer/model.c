// trainer/model.c: the LLaMA-family model over the op API (model.h).
#include "trainer/model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/mem.h"
#include "kernels/nf4.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"

// The fewest rows a chunk of logits holds (all of them when fewer): see
// model_setup. A build-time knob for measuring the choice.
#ifndef MT_LOSS_MIN_ROWS
#define MT_LOSS_MIN_ROWS 256
#endif
// The most tensors of one layer a MeZO pair keeps mirrored (see mirror_room).
#define MIRRORS 16

// Indices into a layer's parameters, in table order.
enum {
    P_LN1,
    P_WQ,
    P_BQ,
    P_WK,
    P_BK,
    P_WV,
    P_BV,
    P_QN,
    P_KN,
    P_WO,
    P_BO,
    P_ANORM,  // Gemma: the attention output's norm
    P_LN2,
    P_WG,
    P_WU,
    P_WD,
    P_FNORM,  // Gemma: the MLP output's norm
    P_LAYER_COUNT
};

// The base parameter each LoRA module adapts.
static const int lora_base_param[MT_LORA_MODULES] = {P_WQ, P_WK, P_WV, P_WO, P_WG, P_WU, P_WD};

typedef struct {
    void *w[P_LAYER_COUNT];   // compute weights (NULL when absent, e.g. no bias, or in NF4)
    float *g[P_LAYER_COUNT];  // gradients (NULL when frozen)
    mt_nf4 q[P_LAYER_COUNT];  // NF4 storage of the linear weights (QLoRA)
    void *lora_a[MT_LORA_MODULES], *lora_b[MT_LORA_MODULES];     // (r, IN), (OUT, r); NULL: no adapter
    float *glora_a[MT_LORA_MODULES], *glora_b[MT_LORA_MODULES];  // their gradients
    int index[P_LAYER_COUNT];                                    // in the parameter table (-1: absent)
    void *home[P_LAYER_COUNT];  // streamed weights: where w[] lives in the host store (else w[] itself)
    mt_nf4 qh[P_LAYER_COUNT];   // and q[]
    int lora_index_a[MT_LORA_MODULES], lora_index_b[MT_LORA_MODULES];  // in the adapter table
} layer_params;

// What backward needs from a layer's forward, in the activation type.
typedef struct {
    void *ln1, *q, *k, *v, *atty, *x2, *ln2, *gate, *up;  // (N,C) (B,H,T,D) (B,KV,T,D) x2 (N,HD) (N,C) x2 (N,F) x2
    float *rstd1, *rstd2;                                 // (N)
    float *lse;                                           // (B, H, T) attention log-sum-exp
    void *lora_u[MT_LORA_MODULES];                        // (N, r) A dropout(x), per adapted module
    void *qraw, *kraw;                                    // Qwen3: (N, HD), (N, KVD) projections before the head norms
    float *rstd_q, *rstd_k;                               // (N*H), (N*KV)
    void *attn_out, *mlp_out;                             // Gemma: (N, C) o_proj's and down_proj's outputs
    float *rstd_a, *rstd_f;                               // (N) their norms'
} layer_acts;

struct mt_model {
    mt_backend *be;
    mt_model_config cfg;
    int B, T, checkpointing;
    mt_attention_shape attn;  // B, T, heads, head dim and window of every layer's attention
    mt_param_info *params;
    int num_params;
    size_t total;
    size_t *compute_offset;  // (num_params) element offset in `weights`; NF4 tensors take none
    size_t compute_total;
    void *weights;  // (compute_total) compute dtype
    float *grads;   // (total) fp32; NULL when the base is frozen or gradients are streamed
    // streamed gradients (mt_model_options.grad_ready)
    mt_grad_ready_fn grad_ready;
    mt_grads_done_fn grads_done;
    void *grads_done_ctx;
    void *grad_ready_ctx;
    mt_weights_needed_fn weights_needed;
    void *weights_needed_ctx;
    float *grad_stream;  // one layer's gradients, or lm_head's or the embedding's (untied);
                         // two such buffers, alternating, with grads_done
    float *grad_outer;   // the final norm's, then a tied embedding's
    size_t grad_stream_count, grad_outer_count;
    int grad_buffers;
    mt_agree_fn agree;  // data parallelism: whether any rank's loss is non-finite
    int skipped;        // the last step's backward was skipped
    void *agree_ctx;
    // LoRA / QLoRA
    mt_lora_config lora;
    float lora_scale;
    int frozen, quantized;
    mt_param_info *adapter_params;
    int num_adapter_params;
    size_t adapter_total;
    void *adapter_weights;             // (adapter_total) compute dtype
    float *adapter_grads;              // (adapter_total) fp32
    void *nf4_storage;                 // every NF4 tensor, one block
    void *dequant;                     // one linear weight, dequantized (compute dtype)
    int dequant_layer, dequant_param;  // what `dequant` holds (-1: nothing)
    // streamed base weights (mt_model_options.stream_weights): `weights` and
    // `nf4_storage` are the host store; on the backend the embedding, final
    // norm and lm_head (outer) and two slots of one layer's weights each
    // that the streamed layers take turns in, then one slot for each of the
    // first `resident` layers (mt_model_options.resident_layers)
    int streamed, resident, nslots;
    int in_file;  // the store is a file's mapping (model.weights: ssd)
    void *outer, *resident_block;
    void **slots;                     // (nslots): 0 and 1 rotate, 2 + l is resident layer l's
    int *slot_layer, *slot_ticket;    // the layer each slot holds (-1: none), its copy in (-1: waited for)
    int *slot_dirty;                  // MeZO's update changed the slot: written back before reuse
    int *slot_wb;                     // the copy out of the slot's last write-back (-1: none)
    int *store_wb;                    // (L) the copy out of each layer's last write-back into the store
    struct stream_trace *trace;       // the streamed weights' timeline while one is taken (NULL: none)
    int *param_layer;                 // (num_params) the layer of each parameter, -1 outside layers
    size_t *layer_first;              // (L+1) element offset of each layer's span in the compute block
    size_t layer_compute, layer_nf4;  // bytes of one layer's compute weights, NF4 storage
    uint64_t dropout_seed;
    int training;  // dropout on (a backward step)
    int forward_only;
    // MeZO: the perturbation the forward applies (scale 0: none)
    uint64_t perturb_seed;
    float perturb_scale;
    unsigned char *perturb_selected;                 // per trainable parameter
    void *perturb_matrix, *perturb_vector;           // scratch: the widest selected matrix and vector
    int perturb_matrix_holds, perturb_vector_holds;  // the trainable index each holds (-1: none)
    size_t perturb_bytes;
    // A pair's - pass reads the layer tensors that the + pass's kernels also
    // wrote with the opposite sign (one draw of z for both) into
    // perturb_matrix's room past the widest layer matrix, which only the
    // lm_head's perturbation, after the layers, needs. MT_MEZO_MIRROR=0: none.
    size_t mirror_from, mirror_room, mirror_used;  // elements of perturb_matrix
    int mirror_recording;                          // the + pass of a pair's layer
    int mirrors, mirror_index[MIRRORS];            // what the room holds for this layer
    size_t mirror_at[MIRRORS];
    size_t mirror_saved;  // perturbation passes the mirrors spared (a count, for tests)
    // a deferred MeZO update (mt_model_defer_update)
    int pending;                  // trainable tensors whose update is still to apply
    unsigned char *pending_left;  // per trainable parameter
    mt_zo_directions pending_directions;
    float pending_lr, pending_decay;
    uint64_t pending_round_seed;
    int index_wte, index_norm, index_lm;  // in the parameter table (lm: wte's when tied)
    void *lora_du;                        // (N, r), or three of them (see lora_du_of)
    int du_in_f1;                         // without dropout, f1 holds a group's later du (lora_du_of)
    void *drop_buf;                       // (rows, IN) dropout(x), and its gradient (see lora_du_of)
    layer_params *layers;
    void *wte, *norm_w, *lm_w;
    float *g_wte, *g_norm, *g_lm;
    // activations
    void *act_block;
    void **x;       // (L+1) residual stream inputs, (N, C) each
    void **x_pair;  // forward-only: a second stream's, for MeZO's paired passes
    // offload: x[0..kept-1] have buffers of their own on the backend, x[l]
    // from kept on lives in slot (l - kept) % 2; x[kept..L-2] are copied to
    // host_x in forward and fetched back in backward, beside the compute
    int offload, kept;
    void *host_x;  // (L-1-kept-on_disk, N, C) pinned host memory
    void *disk_x;  // (on_disk, N, C): the last offloaded inputs, a mapped file (ssd_layer_inputs)
    int on_disk;
    int *tickets;                  // (L+1) the copy that last moved x[l]
    layer_acts *acts;              // L sets, or 1 shared set with checkpointing
    void *lnf;                     // (N, C)
    float *rstdf;                  // (N)
    void *qkv_flat;                // (N, (H+2KV)D) projections before rope
    void *scratch_c;               // (N, C) o_proj / down_proj output; also lnf, between the layers' passes
    void *f0, *f1;                 // (N, F) swiglu out (then gate grad), its grad
    void *dres, *dln;              // (N, C) residual grad, norm-input grad
    void *datty;                   // (N, HD), or NULL: the layer's x2|ln2 hold it (datty_in_x2)
    int datty_in_x2;               // d(atty) lives from o_proj's backward to attention's, when x2|ln2 are free
    void *dq, *dk, *dv;            // (B,H,T,D), (B,KV,T,D) x2
    void *dqkv_flat;               // (N, (H+2KV)D), or NULL: the layer's x2 and ln2 hold it (dqkv_in_x2)
    int dqkv_in_x2;                // qkv_flat lies in dq|dk|dv and dqkv_flat in the layer's x2|ln2
    float *logits;                 // (R, V) fp32 chunk
    void *dlogits;                 // (R, V) activation type (aliases logits on the CPU)
    float *losses;                 // (N)
    int32_t *tokens, *targets;     // (N) where the backend computes
    int32_t *pos;                  // (N) positions in documents (document_mask) or sequences (decoding)
    float *cos_table, *sin_table;  // (T, D/2), decoding (decode_len, D/2)
    float *cos_local, *sin_local;  // Gemma's sliding layers' (as above), else NULL
    int decode_len;                // decoding: positions per row's cache, else 0
    void *decode_graph;            // decoding on a GPU: a step's launches as one CUDA Graph (NULL: none yet)
    int decode_graph_off;          // decoding runs op by op (decode_graph_note says why)
    char decode_graph_note[160];
    int mlp_rows, mlp_tiled;        // rows of an MLP tile (N: untiled), and whether N > mlp_rows
    void *kcache, *vcache;          // (L, B, KV, decode_len, D) compute dtype
    mt_attention_shape attn_local;  // Gemma's sliding layers' attention
    int chunk_rows;
};

// ------------------------------------------------------- parameter table

void mt_model_init_random(const mt_model_config *cfg, float *params, uint64_t seed) {
    int n;
    size_t total;
    free(mt_model_param_table(cfg, &n, &total));
    memset(params, 0, total * sizeof(float));
    mt_model_init_random_params(cfg, 0, n, params, seed);
}

void mt_model_init_random_params(const mt_model_config *cfg, int first, int count, float *dst, uint64_t seed) {
    int n;
    size_t total;
    mt_param_info *t = mt_model_param_table(cfg, &n, &total);
    for (int i = first; i < first + count; i++) {
        float *p = dst + (t[i].offset - t[first].offset);
        const char *name = t[i].name;
        size_t len = strlen(name);
        int is_bias = len > 5 && !strcmp(name + len - 5, ".bias");
        if (t[i].ndim == 1) {
            // norms scale by w (1 + w with Gemma's: 0 there), biases start at 0
            for (size_t j = 0; j < t[i].count; j++) p[j] = is_bias || cfg->gemma ? 0.0f : 1.0f;
        } else {
            // counter-based draws, four a group of the block's element index:
            // the same values whatever the thread count or the unit loaded
            size_t c0 = t[i].offset, c1 = c0 + t[i].count;
#pragma omp parallel for
            for (size_t g = c0 / 4; g < (c1 + 3) / 4; g++) {
                float z[4];
                mt_rng_normal4(seed, g, z);
                for (size_t c = 4 * g; c < 4 * g + 4; c++)
                    if (c >= c0 && c < c1) p[c - c0] = cfg->init_std * z[c - 4 * g];
            }
        }
    }
    free(t);
}

// ------------------------------------------------------------- creation

static int find_param(const mt_model *m, const char *name) {
    for (int i = 0; i < m->num_params; i++)
        if (!strcmp(m->params[i].name, name)) return i;
    return -1;
}

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

// Streamed gradients: the shared buffer holds one layer's span of the
// parameter table, or an untied embedding or lm_head; the outer one the
// final norm and a tied embedding.
static void size_streamed_grads(mt_model *m) {
    const mt_model_config *c = &m->cfg;
    int tied = find_param(m, "lm_head.weight") < 0;
    size_t span = 0, table = (size_t)c->V * c->C;
    if (c->L > 0) {
        int first = find_param(m, "model.layers.0.input_layernorm.weight");
        int next =
            c->L > 1 ? find_param(m, "model.layers.1.input_layernorm.weight") : find_param(m, "model.norm.weight");
        span = m->params[next].offset - m->params[first].offset;
    }
    m->grad_stream_count = align16(tied || span > table ? span : table);
    m->grad_outer_count = align16((size_t)c->C) + (tied ? align16(table) : 0);
}

size_t mt_model_streamed_grad_bytes(const mt_model *m) {
    return (m->grad_buffers * m->grad_stream_count + m->grad_outer_count) * sizeof(float);
}

// The streamed buffer of layer l; with two, the head's (after layer L-1's
// turn: index L) and an untied embedding's (after layer 0's: index 1)
// alternate with the layers', so a buffer's gradients can be communicated
// while backward fills the other.
static float *stream_buffer(const mt_model *m, int index) {
    return m->grad_stream + (m->grad_buffers == 2 ? (size_t)(index & 1) * m->grad_stream_count : 0);
}

void mt_model_set_agreement(mt_model *m, mt_agree_fn any, void *ctx) { m->agree = any, m->agree_ctx = ctx; }
int mt_model_backward_skipped(const mt_model *m) { return m->skipped; }

// Phi-3: whether layer parameter p is a row block of another (k and v of
// q's qkv_proj, up of gate's gate_up_proj), and its element offset there.
static int fused_part(const mt_model_config *c, int p, int *whole, size_t *off) {
    for (int t = 0; t < MT_LORA_MODULES; t++)
        if (lora_base_param[t] == p && mt_lora_fused_part(c, t)) {
            *whole = lora_base_param[mt_lora_fused_owner(c, t)];
            *off = mt_lora_fused_rows(c, t) * (size_t)c->C;
            return 1;
        }
    return 0;
}

static void bind_params(mt_model *m) {
    size_t act = mt_act_size(m->be);
    char name[160];
    // Gemma names the MLP's input norm pre_feedforward_layernorm, and its
    // post_attention_layernorm normalises the attention's output
    int gemma = m->cfg.gemma;
    int fused = m->cfg.fused;  // Phi-3: k, v and up are row blocks of q's and gate's tensors (bound below)
    const char *const suffix[P_LAYER_COUNT] = {
        "input_layernorm.weight",
        fused ? "self_attn.qkv_proj.weight" : "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "self_attn.o_proj.weight",
        "self_attn.o_proj.bias",
        gemma ? "post_attention_layernorm.weight" : "(none)",
        gemma ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight",
        fused ? "mlp.gate_up_proj.weight" : "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        gemma ? "post_feedforward_layernorm.weight" : "(none)"};
#define WPTR(i) (m->compute_offset[i] == SIZE_MAX ? NULL : (char *)m->weights + m->compute_offset[i] * act)
#define GPTR(i) (m->grads ? m->grads + m->params[i].offset : NULL)
    for (int l = 0; l < m->cfg.L; l++) {
        size_t base = 0;  // streamed: the layer's gradients start the shared buffer
        for (int p = 0; p < P_LAYER_COUNT; p++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix[p]);
            int i = find_param(m, name);
            if (p == 0) base = m->params[i].offset;
            m->layers[l].w[p] = i < 0 ? NULL : WPTR(i);
            m->layers[l].g[p] = i < 0 ? NULL : GPTR(i);
            if (i >= 0 && m->grad_stream) m->layers[l].g[p] = stream_buffer(m, l) + (m->params[i].offset - base);
            m->layers[l].index[p] = i;
        }
        for (int p = 0; p < P_LAYER_COUNT && fused; p++) {
            int whole;
            size_t off;
            if (!fused_part(&m->cfg, p, &whole, &off)) continue;
            layer_params *L = &m->layers[l];
            L->w[p] = L->w[whole] ? (char *)L->w[whole] + off * act : NULL;
            L->g[p] = L->g[whole] ? L->g[whole] + off : NULL;  // index stays -1: the whole is handed over once
        }
    }
    for (int i = 0; i < m->num_adapter_params; i++) {
        int l, module, is_b;
        MT_CHECK(mt_lora_parse_name(m->adapter_params[i].name, &l, &module, &is_b), "adapter name %s",
                 m->adapter_params[i].name);
        void *w = (char *)m->adapter_weights + m->adapter_params[i].offset * act;
        float *g = m->adapter_grads ? m->adapter_grads + m->adapter_params[i].offset : NULL;
        if (is_b)
            m->layers[l].lora_b[module] = w, m->layers[l].glora_b[module] = g, m->layers[l].lora_index_b[module] = i;
        else
            m->layers[l].lora_a[module] = w, m->layers[l].glora_a[module] = g, m->layers[l].lora_index_a[module] = i;
    }
    // Phi-3: the parts of a fused module share its A (their dA add up) and
    // take row blocks of its B
    for (int l = 0; l < m->cfg.L && m->cfg.fused; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) {
            layer_params *L = &m->layers[l];
            int owner = mt_lora_fused_owner(&m->cfg, t);
            if (owner == t || !L->lora_a[owner]) continue;
            size_t off = mt_lora_fused_rows(&m->cfg, t) * (size_t)m->lora.r;
            L->lora_a[t] = L->lora_a[owner], L->glora_a[t] = L->glora_a[owner];
            L->lora_b[t] = (char *)L->lora_b[owner] + off * act;
            L->glora_b[t] = L->glora_b[owner] ? L->glora_b[owner] + off : NULL;
            L->lora_index_a[t] = L->lora_index_a[owner], L->lora_index_b[t] = L->lora_index_b[owner];
        }
    int i = find_param(m, "model.embed_tokens.weight");
    m->wte = WPTR(i), m->g_wte = GPTR(i), m->index_wte = i;
    i = find_param(m, "model.norm.weight");
    m->norm_w = WPTR(i), m->g_norm = GPTR(i), m->index_norm = i;
    i = find_param(m, "lm_head.weight");
    if (m->grad_stream) {
        m->g_norm = m->grad_outer;
        m->g_wte = i < 0 ? m->grad_outer + align16(m->cfg.C) : stream_buffer(m, 1);
    }
    if (i < 0)
        m->lm_w = m->wte, m->g_lm = m->g_wte, m->index_lm = m->index_wte;
    else
        m->lm_w = WPTR(i), m->g_lm = m->grad_stream ? stream_buffer(m, m->cfg.L) : GPTR(i), m->index_lm = i;
#undef WPTR
#undef GPTR
}

// RoPE's D/2 inverse frequencies as transformers computes them, for a table
// of `positions` rows (longrope's factors depend on it).
static void rope_inv_freq(const mt_model_config *c, int local, int positions, float *inv_freq) {
    int half = c->D / 2;
    for (int i = 0; i < half; i++) {
        double theta = local ? c->rope_local_theta : c->rope_theta;
        inv_freq[i] = (float)(1.0 / pow(theta, (double)(2 * i) / c->D));
        if (local) continue;  // Gemma's sliding layers: no scaling
        if (c->rope_longrope) {
            const float *ext = positions > c->rope_original_max_position ? c->rope_long_factor : c->rope_short_factor;
            inv_freq[i] = (float)(1.0 / ((double)ext[i] * pow(theta, (double)(2 * i) / c->D)));
            continue;
        }
        if (c->rope_linear_factor > 0) inv_freq[i] = (float)((double)inv_freq[i] / c->rope_linear_factor);
        if (!c->rope_llama3) continue;
        // Llama 3.1 frequency scaling: long wavelengths divided by factor,
        // short ones kept, a smooth blend between
        double old_len = c->rope_original_max_position;
        double low_wavelen = old_len / c->rope_low_freq_factor, high_wavelen = old_len / c->rope_high_freq_factor;
        double wavelen = 2.0 * M_PI / inv_freq[i];
        double f = inv_freq[i];
        if (wavelen > low_wavelen)
            f = f / c->rope_factor;
        else if (wavelen >= high_wavelen) {
            double smooth =
                (old_len / wavelen - c->rope_low_freq_factor) / (c->rope_high_freq_factor - c->rope_low_freq_factor);
            f = (1.0 - smooth) * f / c->rope_factor + smooth * f;
        }
        inv_freq[i] = (float)f;
    }
}

void mt_model_rope_tables(const mt_model_config *c, int local, int positions, float *cos_table, float *sin_table) {
    float *inv_freq = malloc((size_t)(c->D / 2) * sizeof(float));
    MT_CHECK(inv_freq != NULL, "rope tables");
    rope_inv_freq(c, local, positions, inv_freq);
    mt_rope_tables(cos_table, sin_table, inv_freq, positions, c->D);
    free(inv_freq);
    if (local || !c->rope_longrope || c->rope_attention_factor == 1.0f) return;
    // longrope scales cos and sin (fp32 products, as torch multiplies a table by a float)
    size_t n = (size_t)positions * (c->D / 2);
    for (size_t i = 0; i < n; i++) cos_table[i] *= c->rope_attention_factor, sin_table[i] *= c->rope_attention_factor;
}

// Carves `bytes` from a block with 256-byte alignment. Works on addresses as
// integers so that a dry run from address 0 can measure the block's size.
static void *carve(uintptr_t *cursor, size_t bytes) {
    void *p = (void *)*cursor;
    *cursor += (bytes + 255) & ~(size_t)255;
    return p;
}

// Positions the RoPE tables cover: a row's tokens, or a decoding cache's.
static int rope_rows(const mt_model *m) { return m->decode_len ? m->decode_len : m->T; }

static size_t layout_activations(mt_model *m, uintptr_t base) {
    const mt_model_config *c = &m->cfg;
    size_t N = (size_t)m->B * m->T, a = mt_act_size(m->be), HD = (size_t)c->H * c->D, KVD = (size_t)c->KV * c->D;
    uintptr_t cur = base;
    int backward = !m->forward_only;
    // The projections before RoPE (qkv_flat) live from the q/k/v product to RoPE, in forward and in backward's
    // recompute, when dq|dk|dv are free; their gradient (dqkv_flat) from RoPE's backward to the products'
    // backward, when the layer's x2 and ln2 are (their norm's backward has run): no buffers of their own where
    // x2|ln2 hold (H + 2 KV) D values a token (Llama: 12 KiB a token of 8B's 148 saved)
    m->dqkv_in_x2 = backward && HD + 2 * KVD <= 2 * (size_t)c->C;
    // d(atty) too, before dqkv_flat: from o_proj's backward (after ln2's) to attention's, before RoPE's backward
    // writes there (8B: 8 KiB a token)
    m->datty_in_x2 = backward && HD <= 2 * (size_t)c->C;
    if (m->offload || m->forward_only) {
        for (int l = 0; l < m->kept; l++) m->x[l] = carve(&cur, N * c->C * a);
        void *slots[2] = {carve(&cur, N * c->C * a), carve(&cur, N * c->C * a)};
        for (int l = m->kept; l <= c->L; l++) m->x[l] = slots[(l - m->kept) % 2];
        void *pair[2] = {NULL, NULL};
        if (m->forward_only && !m->decode_len) pair[0] = carve(&cur, N * c->C * a), pair[1] = carve(&cur, N * c->C * a);
        for (int l = 0; l <= c->L && m->x_pair; l++) m->x_pair[l] = pair[l % 2];
    } else {
        for (int l = 0; l <= c->L; l++) m->x[l] = carve(&cur, N * c->C * a);
    }
    int sets = m->checkpointing || m->forward_only ? 1 : c->L;
    for (int s = 0; s < sets; s++) {
        layer_acts *A = &m->acts[s];
        A->ln1 = carve(&cur, N * c->C * a);
        A->q = carve(&cur, N * HD * a);
        A->k = carve(&cur, N * KVD * a);
        A->v = carve(&cur, N * KVD * a);
        A->atty = carve(&cur, N * HD * a);
        A->x2 = carve(&cur, N * c->C * a);
        A->ln2 = carve(&cur, N * c->C * a);
        A->gate = carve(&cur, (size_t)m->mlp_rows * c->F * a);
        A->up = carve(&cur, (size_t)m->mlp_rows * c->F * a);
        A->rstd1 = carve(&cur, N * 4);
        A->rstd2 = carve(&cur, N * 4);
        A->lse = carve(&cur, N * c->H * 4);
        for (int t = 0; t < MT_LORA_MODULES; t++)
            A->lora_u[t] = m->lora.targets >> t & 1 ? carve(&cur, N * m->lora.r * a) : NULL;
        A->qraw = c->qk_norm ? carve(&cur, N * HD * a) : NULL;
        A->kraw = c->qk_norm ? carve(&cur, N * KVD * a) : NULL;
        A->rstd_q = c->qk_norm ? carve(&cur, N * c->H * 4) : NULL;
        A->rstd_k = c->qk_norm ? carve(&cur, N * c->KV * 4) : NULL;
        A->attn_out = c->gemma ? carve(&cur, N * c->C * a) : NULL;
        A->mlp_out = c->gemma ? carve(&cur, N * c->C * a) : NULL;
        A->rstd_a = c->gemma ? carve(&cur, N * 4) : NULL;
        A->rstd_f = c->gemma ? carve(&cur, N * 4) : NULL;
    }
    // a group's later members (k and v; up) keep their du beside dropout(x) in drop_buf, or without dropout in
    // f1 where it holds them (lora_du_of), else in lora_du
    int dropout = m->lora.r && m->lora.dropout > 0 && backward;
    m->du_in_f1 = 2 * N * m->lora.r <= (size_t)m->mlp_rows * c->F;
    size_t du_slots = dropout || m->du_in_f1 ? 1 : 3;
    m->lora_du = m->lora.r && backward ? carve(&cur, du_slots * N * m->lora.r * a) : NULL;
    // dropout's inputs: ln1 (with k's and v's du beside it: lora_du_of) and o_proj's over every row; ln2 (with
    // up's du) and down_proj's intermediate over the MLP's rows (a tile of them with mlp_tile_rows)
    size_t grouped = (size_t)c->C + 2 * (size_t)m->lora.r, all_rows = grouped > HD ? grouped : HD;
    size_t F = (size_t)c->F, drop = N * all_rows, mlp = (size_t)m->mlp_rows * (F > grouped ? F : grouped);
    if (mlp > drop) drop = mlp;
    m->drop_buf = dropout ? carve(&cur, drop * a) : NULL;
    m->rstdf = carve(&cur, N * 4);
    m->qkv_flat = m->dqkv_in_x2 ? NULL : carve(&cur, N * (HD + 2 * KVD) * a);
    m->scratch_c = carve(&cur, N * c->C * a);
    // the final norm's output is made after the last layer and read by the head before backward's first
    // layer: the layers' scratch is free all that time
    m->lnf = m->scratch_c;
    m->f0 = carve(&cur, (size_t)m->mlp_rows * c->F * a);
    if (backward) {
        m->f1 = carve(&cur, (size_t)m->mlp_rows * c->F * a);
        m->dres = carve(&cur, N * c->C * a);
        m->dln = carve(&cur, N * c->C * a);
        m->datty = m->datty_in_x2 ? NULL : carve(&cur, N * HD * a);
        m->dq = carve(&cur, N * HD * a);
        m->dk = carve(&cur, N * KVD * a);
        m->dv = carve(&cur, N * KVD * a);
    }
    if (m->dqkv_in_x2) m->qkv_flat = m->dq;             // dq, dk, dv: one span, at least as long
    m->dqkv_flat = m->dqkv_in_x2 ? NULL : m->qkv_flat;  // free once rope has read it, in forward and in recompute
    m->logits = carve(&cur, (size_t)m->chunk_rows * c->V * 4);
    if (backward) m->dlogits = m->be->gpu ? carve(&cur, (size_t)m->chunk_rows * c->V * a) : (void *)m->logits;
    m->losses = carve(&cur, N * 4);
    m->tokens = carve(&cur, N * 4);
    m->targets = carve(&cur, N * 4);
    m->pos = m->attn.docs || m->decode_len ? carve(&cur, N * 4) : NULL;
    size_t table = (size_t)rope_rows(m) * (c->D / 2) * 4;
    m->cos_table = carve(&cur, table);
    m->sin_table = carve(&cur, table);
    m->cos_local = c->global_every ? carve(&cur, table) : NULL;
    m->sin_local = c->global_every ? carve(&cur, table) : NULL;
    return (size_t)(cur - base);
}

// The index of the weight that module t of layer l adapts (and QLoRA stores
// in NF4).
static int linear_param(const mt_model *m, int l, int t) {
    char name[160];
    mt_lora_base_name(&m->cfg, name, sizeof name, l, (mt_lora_module)t);
    int i = find_param(m, name);
    MT_CHECK(i >= 0, "no parameter %s", name);
    return i;
}

// The model's tables and sizes, from the config and options, before any
// allocation (mt_model_create_with allocates after it; memtune plan only
// counts). nf4_bytes, widest_linear: QLoRA's NF4 block and its widest weight.
static mt_model *model_setup(mt_backend *be, const mt_model_config *cfg, const mt_model_options *o,
                             mt_attention_shape attn, size_t *nf4_bytes, size_t *widest_linear) {
    mt_model *m = calloc(1, sizeof *m);
    MT_CHECK(m != NULL, "model");
    m->be = be;
    m->attn = attn;
    m->cfg = *cfg;
    m->B = o->B, m->T = o->T, m->checkpointing = o->activation_checkpointing;
    m->lora = o->lora;
    if (m->lora.r <= 0) m->lora.targets = 0, m->lora.r = 0;
    m->lora_scale = m->lora.r ? mt_lora_scale(&m->lora) : 0.0f;
    m->frozen = m->lora.r > 0;
    m->quantized = o->quantize_nf4;
    m->dequant_layer = m->dequant_param = -1;
    m->offload = o->offload_activations && o->activation_checkpointing && cfg->L >= 2;
    m->kept = m->offload ? (o->gpu_layer_inputs < cfg->L - 1 ? o->gpu_layer_inputs : cfg->L - 1) : 0;
    int offloaded_inputs = m->offload ? cfg->L - 1 - m->kept : 0;
    m->on_disk =
        o->activations_dir ? (o->ssd_layer_inputs < offloaded_inputs ? o->ssd_layer_inputs : offloaded_inputs) : 0;
    m->params = mt_model_param_table(cfg, &m->num_params, &m->total);
    if (m->lora.r) m->adapter_params = mt_lora_param_table(cfg, &m->lora, &m->num_adapter_params, &m->adapter_total);
    m->compute_offset = calloc((size_t)m->num_params, sizeof(size_t));
    m->layers = calloc((size_t)cfg->L, sizeof *m->layers);
    m->x = calloc((size_t)cfg->L + 1, sizeof *m->x);
    m->x_pair = o->forward_only ? calloc((size_t)cfg->L + 1, sizeof *m->x_pair) : NULL;
    m->forward_only = o->forward_only;
    m->streamed = o->stream_weights;
    m->resident = m->streamed ? (o->resident_layers < cfg->L ? o->resident_layers : cfg->L) : 0;
    m->nslots = m->streamed ? 2 + m->resident : 0;
    m->slots = calloc((size_t)m->nslots + 1, sizeof *m->slots);
    int *slot_ints = malloc(((size_t)m->nslots + 1) * 4 * sizeof *slot_ints);
    MT_CHECK(m->slots && slot_ints, "model tables");
    m->slot_layer = slot_ints, m->slot_ticket = slot_ints + m->nslots + 1;
    m->slot_dirty = slot_ints + 2 * (m->nslots + 1), m->slot_wb = slot_ints + 3 * (m->nslots + 1);
    for (int k = 0; k < m->nslots; k++) m->slot_layer[k] = m->slot_ticket[k] = m->slot_wb[k] = -1, m->slot_dirty[k] = 0;
    m->store_wb = malloc((size_t)cfg->L * sizeof *m->store_wb);
    MT_CHECK(m->store_wb != NULL || cfg->L == 0, "model tables");
    for (int l = 0; l < cfg->L; l++) m->store_wb[l] = -1;
    m->param_layer = malloc((size_t)m->num_params * sizeof *m->param_layer);
    MT_CHECK(m->param_layer != NULL, "model tables");
    for (int i = 0; i < m->num_params; i++) {
        int unit = mt_param_forward_unit(m->params[i].name, cfg->L);  // 1 + l for layer l's
        m->param_layer[i] = unit >= 1 && unit <= cfg->L ? unit - 1 : -1;
    }
    m->decode_len = o->decode_len;
    int tokens = o->B * o->T;
    m->mlp_rows = o->mlp_tile_rows > 0 && o->mlp_tile_rows < tokens ? o->mlp_tile_rows : tokens;
    m->mlp_tiled = m->mlp_rows < tokens;
    MT_CHECK(!m->decode_len || (o->forward_only && o->T == 1 && !o->document_mask),
             "decoding needs a forward-only model of one token per row");
    m->perturb_matrix_holds = m->perturb_vector_holds = -1;
    m->acts = calloc((size_t)(m->checkpointing || m->forward_only ? 1 : cfg->L), sizeof *m->acts);
    m->tickets = calloc((size_t)cfg->L + 1, sizeof *m->tickets);
    MT_CHECK(m->compute_offset && m->layers && m->x && m->acts && m->tickets, "model tables");
    // NF4 tensors live in their own block; the rest keep the table's order
    *nf4_bytes = 0, *widest_linear = 0;
    for (int l = 0; l < cfg->L && m->quantized; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) {
            if (mt_lora_fused_part(cfg, t)) continue;  // Phi-3: stored with the module it is part of
            int i = linear_param(m, l, t);
            m->compute_offset[i] = SIZE_MAX;
            *nf4_bytes += mt_nf4_storage_bytes(m->params[i].count);
            if (m->params[i].count > *widest_linear) *widest_linear = m->params[i].count;
        }
    for (int i = 0; i < m->num_params; i++) {
        if (m->compute_offset[i] == SIZE_MAX) continue;
        m->compute_offset[i] = m->compute_total;
        m->compute_total += (m->params[i].count + 15) & ~(size_t)15;
    }
    // each layer's span: from its first tensor (its input norm, never NF4) to
    // the next layer's, the last one's to the final norm
    m->layer_first = malloc(((size_t)cfg->L + 1) * sizeof *m->layer_first);
    MT_CHECK(m->layer_first != NULL, "model tables");
    for (int i = m->num_params - 1; i >= 0; i--) {
        int l = m->param_layer[i];
        if (l >= 0) m->layer_first[l] = m->compute_offset[i];
        if (!strcmp(m->params[i].name, "model.norm.weight")) m->layer_first[cfg->L] = m->compute_offset[i];
    }
    // logits chunk: whole rows, 16 Mi elements (64 MiB fp32) or MT_LOSS_MIN_ROWS rows where that is more:
    // lm_head's two products read its whole weight once a chunk, and with fewer rows they wait on that read
    size_t N = (size_t)o->B * o->T, rows = ((size_t)16 << 20) / (size_t)cfg->V;
    if (rows < MT_LOSS_MIN_ROWS) rows = MT_LOSS_MIN_ROWS;
    m->chunk_rows = (int)(rows < N ? rows : N);
    m->grad_ready = o->grad_ready, m->grad_ready_ctx = o->grad_ready_ctx;
    m->grads_done = o->grads_done, m->grads_done_ctx = o->grads_done_ctx;
    m->weights_needed = o->weights_needed, m->weights_needed_ctx = o->weights_needed_ctx;
    return m;
}

// A layer's attention problem (local: Gemma's sliding layers; with
// global_every 0 every layer is alike). The sliding window binds only when
// it is shorter than T.
static mt_attention_shape attention_shape(const mt_model_config *cfg, const mt_model_options *o, int local) {
    int sliding = cfg->global_every == 0 || local;
    int window = sliding && cfg->sliding_window > 0 && cfg->sliding_window < o->T ? (int)cfg->sliding_window : 0;
    return (mt_attention_shape){o->B,
                                o->T,
                                cfg->H,
                                cfg->KV,
                                cfg->D,
                                window,
                                o->document_mask != 0,
                                cfg->attn_scale,
                                o->attention_nondeterministic != 0,
                                o->forward_only != 0};
}

// The larger of the two layer kinds' attention workspaces.
static size_t attention_workspace(mt_backend *be, const mt_model_config *cfg, const mt_model_options *o) {
    mt_attention_shape g = attention_shape(cfg, o, 0), l = attention_shape(cfg, o, 1);
    size_t a = mt_attention_workspace_bytes(be, &g), b = cfg->global_every ? mt_attention_workspace_bytes(be, &l) : 0;
    return a > b ? a : b;
}

// ------------------------------------------------------- streamed weights
//
// With stream_weights the base lives in a host store (`weights` and
// `nf4_storage`, laid out as a resident model's); each layer's span of it is
// copied into one of two slots on the backend before the layer runs, the
// next layer's beside the compute (mt_copy_async: after every op issued so
// far, so a slot is overwritten only once the ops reading it ran). The
// embedding, final norm and lm_head stay on the backend (outer). Every
// layer's span has the same size and layout, so a layer's weights are its
// home pointers moved to the slot.

// The element offset of layer l's first weight in the compute block (l = L:
// the end of the last layer's).
static size_t layer_start(const mt_model *m, int l) { return m->layer_first[l]; }

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

// Bytes of the outer tensors and of one slot.
static void streamed_sizes(mt_model *m, size_t nf4_bytes, size_t *outer, size_t *slot) {
    size_t act = mt_act_size(m->be);
    m->layer_compute = (layer_start(m, 1 < m->cfg.L ? 1 : m->cfg.L) - layer_start(m, 0)) * act;
    for (int l = 1; l < m->cfg.L; l++)
        MT_CHECK((layer_start(m, l + 1) - layer_start(m, l)) * act == m->layer_compute, "layer %d's span differs", l);
    m->layer_nf4 = m->cfg.L ? nf4_bytes / (size_t)m->cfg.L : 0;
    *outer = 0;
    static const char *const names[] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
    for (int k = 0; k < 3; k++) {
        int i = find_param(m, names[k]);
        if (i >= 0) *outer += align16(m->params[i].count) * act;
    }
    *slot = align256(align256(m->layer_compute) + m->layer_nf4);  // (resident slots follow each other)
}

// The outer tensors on the backend (their home stays in the store, where
// mt_model_set_weights writes first).
static void bind_outer(mt_model *m) {
    size_t act = mt_act_size(m->be);
    char *at = m->outer;
    void **ptrs[3] = {&m->wte, &m->norm_w, &m->lm_w};
    int index[3] = {m->index_wte, m->index_norm, m->index_lm};
    for (int k = 0; k < 3; k++) {
        if (k == 2 && m->index_lm == m->index_wte) {
            m->lm_w = m->wte;  // tied
            break;
        }
        *ptrs[k] = at;
        at += align16(m->params[index[k]].count) * act;
    }
}

// Layer l's span of the store: its compute weights, and its NF4 storage
// (NULL without NF4).
static char *store_compute(const mt_model *m, int l) {
    return (char *)m->weights + layer_start(m, l) * mt_act_size(m->be);
}
static char *store_nf4(const mt_model *m, int l) {
    return m->quantized ? (char *)m->nf4_storage + (size_t)l * m->layer_nf4 : NULL;
}

// ---- the streamed weights' timeline (mt_model_trace_begin): each layer's
// compute and each copy of a layer's weights, timed on the device by events
// (on the CPU backend, where copies are plain copies, by the host clock)

enum { TRACE_COMPUTE, TRACE_UPLOAD, TRACE_WRITEBACK, TRACE_TRACKS };
enum { kTraceSpans = 16384 };

typedef struct {
    int track, layer, step, pass;  // pass: trace_compute's
    void *ev[2];                   // start, end (a compute span's end is the next one's start)
    double host[2];
} trace_span;

struct stream_trace {
    trace_span spans[kTraceSpans];
    int n, step, dropped;
    void *origin, *last;  // compute stream: the start, and the end of the last span
    double host_origin, host_last;
};

static void *trace_event(const mt_model *m) { return m->be->gpu ? mt_event_create() : NULL; }

// A new span of `track` for layer l, or NULL when the trace is full.
static trace_span *trace_span_new(mt_model *m, int track, int l, int pass) {
    struct stream_trace *t = m->trace;
    if (t->n == kTraceSpans) {
        t->dropped++;
        return NULL;
    }
    trace_span *s = &t->spans[t->n++];
    *s = (trace_span){track, l, t->step, pass, {NULL, NULL}, {NAN, NAN}};
    return s;
}

// Layer l's compute starts (its weights are in their slot): a compute span on
// the compute stream, which the next one ends. pass: 0 forward, 1 backward,
// 2 a deferred update applied outside either.
static void trace_compute(mt_model *m, int l, int pass) {
    if (!m->trace) return;
    trace_span *s = trace_span_new(m, TRACE_COMPUTE, l, pass);
    if (!s) return;
    s->ev[0] = trace_event(m);
    if (s->ev[0]) mt_event_record(s->ev[0], NULL);
    s->host[0] = mt_now();
}

// A copy of bytes (two parts: the compute weights, then the NF4 codes, if
// any) for layer l: returns the second part's ticket as the copies do.
static int trace_copy(mt_model *m, int track, int l, void *dst, const void *src, size_t bytes, const int *after,
                      int n_after, void *dst2, const void *src2, size_t bytes2) {
    trace_span *s = m->trace ? trace_span_new(m, track, l, 0) : NULL;
    if (s) {
        s->ev[0] = trace_event(m), s->ev[1] = trace_event(m);
        s->host[0] = mt_now();
    }
    void *start = s ? s->ev[0] : NULL, *end = s ? s->ev[1] : NULL;
    int ticket;
    if (!m->be->gpu) {
        memcpy(dst, src, bytes);
        if (bytes2) memcpy(dst2, src2, bytes2);
        ticket = -1;
    } else {
        ticket = mt_copy_async_timed(dst, src, bytes, after, n_after, start, bytes2 ? NULL : end);
        if (bytes2) ticket = mt_copy_async_timed(dst2, src2, bytes2, NULL, 0, NULL, end);
    }
    if (s) s->host[1] = mt_now();
    return ticket;
}

void mt_model_trace_begin(mt_model *m) {
    if (m->trace || !m->streamed) return;
    m->trace = calloc(1, sizeof *m->trace);
    MT_CHECK(m->trace != NULL, "streaming trace");
    m->trace->origin = trace_event(m);
    if (m->trace->origin) mt_event_record(m->trace->origin, NULL);
    m->trace->host_origin = mt_now();
}

void mt_model_trace_step(mt_model *m, int step) {
    if (m->trace) m->trace->step = step;
}

int mt_model_tracing(const mt_model *m) { return m->trace != NULL; }

static void trace_free(mt_model *m) {
    struct stream_trace *t = m->trace;
    if (!t) return;
    for (int i = 0; i < t->n; i++) mt_event_destroy(t->spans[i].ev[0]), mt_event_destroy(t->spans[i].ev[1]);
    mt_event_destroy(t->origin);
    mt_event_destroy(t->last);
    free(t);
    m->trace = NULL;
}

// Milliseconds from the trace's start: an event's, or on the CPU a host time's.
static double trace_ms(const struct stream_trace *t, void *ev, double host) {
    return ev ? (double)mt_event_elapsed_ms(t->origin, ev) : (host - t->host_origin) * 1e3;
}

mt_err mt_model_trace_write(mt_model *m, const char *path) {
    struct stream_trace *t = m->trace;
    if (!t || !path) {
        trace_free(m);
        return MT_OK;
    }
    t->last = trace_event(m);
    if (t->last) mt_event_record(t->last, NULL);
    t->host_last = mt_now();
    if (m->be->gpu) mt_device_synchronize();
    FILE *f = fopen(path, "w");
    if (!f) {
        trace_free(m);
        return mt_errorf(MT_ERR_IO, "%s: cannot write the streaming timeline (%s)", path, strerror(errno));
    }
    static const char *const tracks[TRACE_TRACKS] = {"compute (from a layer's weights in their slot to the next's)",
                                                     "copy in (a layer's weights, store to slot)",
                                                     "copy out (MeZO's updated layer, slot to store)"};
    fprintf(f, "{\"traceEvents\":[\n");
    for (int k = 0; k < TRACE_TRACKS; k++)
        fprintf(f, "%s{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,\"args\":{\"name\":\"%s\"}}",
                k ? ",\n" : "", k + 1, tracks[k]);
    int last_compute = -1;
    for (int i = 0; i < t->n; i++)
        if (t->spans[i].track == TRACE_COMPUTE) last_compute = i;
    for (int i = 0; i < t->n; i++) {
        const trace_span *s = &t->spans[i];
        double a = trace_ms(t, s->ev[0], s->host[0]), b;
        if (s->track != TRACE_COMPUTE) {
            b = trace_ms(t, s->ev[1], s->host[1]);
        } else {  // to the next compute span's start, or the end
            int next = i + 1;
            while (next < t->n && t->spans[next].track != TRACE_COMPUTE) next++;
            b = i == last_compute ? trace_ms(t, t->last, t->host_last)
                                  : trace_ms(t, t->spans[next].ev[0], t->spans[next].host[0]);
        }
        if (!isfinite(a) || !isfinite(b)) continue;
        char name[96];
        if (s->track == TRACE_COMPUTE)
            snprintf(name, sizeof name, "step %d %s layer %d", s->step,
                     s->pass == 2 ? "update"
                     : s->pass    ? "backward"
                                  : "forward",
                     s->layer);
        else
            snprintf(name, sizeof name, "step %d layer %d", s->step, s->layer);
        fprintf(f, ",\n{\"name\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%.1f,\"dur\":%.1f}", name,
                s->track + 1, a * 1e3, (b > a ? b - a : 0.0) * 1e3);
    }
    fprintf(f, "\n]}\n");
    int bad = ferror(f);
    bad |= fclose(f) != 0;
    int dropped = t->dropped;
    trace_free(m);
    if (bad) return mt_errorf(MT_ERR_IO, "%s: writing the streaming timeline failed", path);
    if (dropped) mt_warn("streaming timeline: %d spans past the first %d left out", dropped, (int)kTraceSpans);
    return MT_OK;
}

// MeZO changed slot k's weights: back into the store, beside the compute
// (after the ops that changed them; the copies to the host run beside those
// to the device). A slot's refill and a layer's next copy in wait for it.
static void write_back(mt_model *m, int k) {
    if (!m->slot_dirty[k]) return;
    int l = m->slot_layer[k];
    int ticket =
        trace_copy(m, TRACE_WRITEBACK, l, store_compute(m, l), m->slots[k], m->layer_compute, NULL, 0, NULL, NULL, 0);
    if (m->be->gpu) m->slot_wb[k] = m->store_wb[l] = ticket;
    m->slot_dirty[k] = 0;
}

// Whether layer l keeps a slot of its own (resident_layers), and which.
static int is_resident(const mt_model *m, int l) { return l >= 0 && l < m->resident; }
static int resident_slot(int l) { return 2 + l; }

// The slot holding layer l, or -1.
static int slot_of(const mt_model *m, int l) {
    if (is_resident(m, l)) return m->slot_layer[resident_slot(l)] == l ? resident_slot(l) : -1;
    return m->slot_layer[0] == l ? 0 : m->slot_layer[1] == l ? 1 : -1;
}

// Layer l's update is complete (MeZO: its weights are only read from here
// on): its slot goes back into the store now, beside the rest of the
// layer's work, not when the slot is next refilled, where the copy out and
// the next layer's copy in would run one after the other. A resident
// layer's slot is the weights' home on the backend: it goes back only when
// the store is read (read_streamed), so nothing crosses each step.
static void write_back_layer(mt_model *m, int l) {
    int k = m->streamed && !is_resident(m, l) ? slot_of(m, l) : -1;
    if (k >= 0) write_back(m, k);
}

// Copies layer l's span of the store into slot k (after the slot's write-back
// and the layer's last one).
static void fill_slot(mt_model *m, int k, int l) {
    write_back(m, k);
    const char *compute = store_compute(m, l), *nf4 = store_nf4(m, l);
    char *dst = m->slots[k];
    int after[2] = {m->slot_wb[k], m->store_wb[l]};
    int ticket = trace_copy(m, TRACE_UPLOAD, l, dst, compute, m->layer_compute, after, 2,
                            nf4 ? dst + align256(m->layer_compute) : NULL, nf4, nf4 ? m->layer_nf4 : 0);
    if (m->be->gpu) m->slot_ticket[k] = ticket;
    m->slot_layer[k] = l;
}

// Points layer l's weights (and NF4 storage) into slot k.
static void bind_slot(mt_model *m, int l, int k) {
    layer_params *P = &m->layers[l];
    const char *base = store_compute(m, l), *nf4_base = store_nf4(m, l);
    char *slot = m->slots[k], *slot_nf4 = slot + align256(m->layer_compute);
    for (int p = 0; p < P_LAYER_COUNT; p++) {
        P->w[p] = P->home[p] ? slot + ((const char *)P->home[p] - base) : NULL;
        if (!P->qh[p].n) continue;
        mt_nf4_bind(&P->q[p], slot_nf4 + ((const char *)P->qh[p].codes - nf4_base), P->qh[p].n);
        P->q[p].offset = P->qh[p].offset;
    }
}

// A store in a file: the kernel starts reading layer l's span (compute and
// NF4) into its page cache, so that its copy into a slot finds it there.
static void read_ahead(const mt_model *m, int l) {
    if (!m->in_file || l < 0 || l >= m->cfg.L) return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const char *spans[2] = {store_compute(m, l), store_nf4(m, l)};
    size_t bytes[2] = {m->layer_compute, m->layer_nf4};
    for (int k = 0; k < 2; k++) {
        if (!spans[k] || !bytes[k]) continue;
        uintptr_t begin = (uintptr_t)spans[k] & ~(page - 1);
        madvise((void *)begin, (uintptr_t)spans[k] + bytes[k] - begin, MADV_WILLNEED);  // a hint
    }
}

// The slot layer l is copied into: its own when resident, else the
// rotating one that does not hold `keep` (the layer running, or the one
// prefetched next).
static int slot_for(const mt_model *m, int l, int keep) {
    if (is_resident(m, l)) return resident_slot(l);
    return m->slot_layer[0] == keep && keep >= 0 ? 1 : 0;
}

// Layer l's weights on the backend, waited for; then `next` (-1: none; -2:
// none, outside a forward or backward pass) on its way into a free slot. A
// resident layer's slot is filled the first time the layer runs and after
// its weights are set; then nothing is copied for it.
static void stream_layer(mt_model *m, int l, int next) {
    if (!m->streamed) return;
    int k = slot_of(m, l);
    if (k < 0) {
        k = slot_for(m, l, next);
        fill_slot(m, k, l);
    }
    if (m->be->gpu && m->slot_ticket[k] >= 0) mt_copy_async_wait(m->slot_ticket[k]);
    m->slot_ticket[k] = -1;  // the ops issued from here on run after the copy
    trace_compute(m, l, next == -2 ? 2 : next < l);
    bind_slot(m, l, k);
    if (next >= 0 && next < m->cfg.L && slot_of(m, next) < 0) {
        if (m->weights_needed) m->weights_needed(m->weights_needed_ctx, 1 + next);  // its update is in the store
        fill_slot(m, slot_for(m, next, l), next);
        int after = next + (next > l ? 1 : -1);  // the one after, in this pass's direction
        if (!is_resident(m, after)) read_ahead(m, after);
    }
}

// The backend's scratch for (cfg, o): the larger of attention's (att: its
// larger layer kind's) and, on a GPU, the norms' and the embedding's
// backward (ops.h; the CPU's need none). The run reserves it; the forecast
// counts it.
static size_t scratch_bytes(int gpu, const mt_model_config *cfg, const mt_model_options *o, size_t att) {
    if (!gpu) return att;
    int N = o->B * o->T;
    size_t norm = mt_norm_embedding_workspace_bytes_gpu(N, cfg->C),
           heads = cfg->qk_norm ? mt_norm_embedding_workspace_bytes_gpu(N * cfg->H, cfg->D) : 0;
    if (heads > norm) norm = heads;
    return att > norm ? att : norm;
}

// The base's store: where it computes, in host memory, or mapped from a file in `dir`.
static mt_err store_alloc(void **out, size_t bytes, mt_mem_category cat, mt_mem_place place, const char *dir) {
    return dir ? mt_alloc_file(out, bytes, cat, dir) : mt_alloc(out, bytes, cat, place);
}

mt_err mt_model_create_with(mt_model **out, mt_backend *be, const mt_model_config *cfg, const mt_model_options *o) {
    *out = NULL;
    int B = o->B, T = o->T;
    mt_attention_shape attn = attention_shape(cfg, o, 0), local = attention_shape(cfg, o, 1);
    // decoding reads its caches through its own op, which takes every head dim up to 256
    int supported = o->decode_len
                        ? cfg->D <= 256
                        : mt_attention_supports(be, &attn) && (!cfg->global_every || mt_attention_supports(be, &local));
    if (!supported && attn.docs)
        return mt_errorf(
            MT_ERR_MODEL,
            "head dimension %d with data.document_mask: packed-document masks run on memtune's own GPU "
            "kernel (cuDNN's path does not take them yet), which takes head dims 16, 32, 64, 80, 96 and 128; "
            "set data.document_mask: false, or train on the CPU with train.device: cpu",
            cfg->D);
    if (!supported)
        return mt_errorf(
            MT_ERR_MODEL,
            "head dimension %d is not supported by the GPU attention: cuDNN's fused attention is not "
            "available (%s) and memtune's own kernel takes 16, 32, 64, 80, 96 and 128; install cuDNN 9 (see "
            "docs/development.md) or train on the CPU with train.device: cpu",
            cfg->D, be->cudnn ? "it refused this shape" : be->attention_note);
    MT_CHECK(!o->quantize_nf4 || o->lora.r > 0, "NF4 base weights need LoRA adapters");
    size_t nf4_bytes, widest_linear;
    mt_model *m = model_setup(be, cfg, o, attn, &nf4_bytes, &widest_linear);
    m->attn_local = local;
    size_t N = (size_t)B * T;
    mt_mem_place place = be->gpu ? MT_DEVICE : MT_HOST;
    size_t act = mt_act_size(be);
    MT_CHECK(!m->grad_ready || (!m->frozen && !m->forward_only), "streamed gradients need a full fine-tune");
    MT_CHECK(!m->streamed || m->frozen || m->forward_only || m->weights_needed,
             "streamed weights need a frozen base, a forward-only model or the offloaded optimizer");
    MT_CHECK(!m->resident || m->frozen || m->forward_only,
             "resident layers need a frozen base or a forward-only model");
    // streamed: the base in host memory (pinned where a GPU copies from it), or in a file
    mt_mem_place store = m->streamed ? MT_HOST : place;
    mt_mem_category store_cat = m->streamed ? MT_MEM_OFFLOAD : MT_MEM_WEIGHTS;
    const char *file = m->streamed ? o->weights_dir : NULL;
    m->in_file = file != NULL;
    mt_err err = store_alloc(&m->weights, m->compute_total * act, store_cat, store, file);
    if (!err && !m->frozen && !m->forward_only && !m->grad_ready)
        err = mt_alloc((void **)&m->grads, m->total * sizeof(float), MT_MEM_GRADS, place);
    if (!err && m->grad_ready) {
        size_streamed_grads(m);
        m->grad_buffers = m->grads_done ? 2 : 1;
        err = mt_alloc((void **)&m->grad_stream, m->grad_buffers * m->grad_stream_count * sizeof(float), MT_MEM_GRADS,
                       place);
        if (!err) err = mt_alloc((void **)&m->grad_outer, m->grad_outer_count * sizeof(float), MT_MEM_GRADS, place);
    }
    if (!err && m->quantized) err = store_alloc(&m->nf4_storage, nf4_bytes, store_cat, store, file);
    size_t outer = 0, slot = 0;
    if (m->streamed) streamed_sizes(m, nf4_bytes, &outer, &slot);
    if (!err && m->streamed) err = mt_alloc(&m->outer, outer, MT_MEM_WEIGHTS, place);
    for (int k = 0; k < 2 && !err && m->streamed; k++) err = mt_alloc(&m->slots[k], slot, MT_MEM_WEIGHTS, place);
    if (!err && m->resident) err = mt_alloc(&m->resident_block, (size_t)m->resident * slot, MT_MEM_WEIGHTS, place);
    for (int l = 0; l < m->resident && !err; l++) m->slots[resident_slot(l)] = (char *)m->resident_block + l * slot;
    if (!err && m->quantized) err = mt_alloc(&m->dequant, widest_linear * act, MT_MEM_WEIGHTS, place);
    if (!err && m->lora.r) err = mt_alloc(&m->adapter_weights, m->adapter_total * act, MT_MEM_ADAPTERS, place);
    if (!err && m->lora.r && !m->forward_only)
        err = mt_alloc((void **)&m->adapter_grads, m->adapter_total * sizeof(float), MT_MEM_GRADS, place);
    size_t act_bytes = layout_activations(m, 0);
    if (!err) err = mt_alloc(&m->act_block, act_bytes, MT_MEM_ACTIVATIONS, place);
    size_t in_host = m->offload ? (size_t)(cfg->L - 1 - m->kept - m->on_disk) : 0;
    if (!err && in_host) err = mt_alloc(&m->host_x, in_host * N * cfg->C * act, MT_MEM_OFFLOAD, MT_HOST);
    if (!err && m->on_disk)
        err = mt_alloc_file(&m->disk_x, (size_t)m->on_disk * N * cfg->C * act, MT_MEM_OFFLOAD, o->activations_dir);
    size_t cache = mt_model_kv_cache_bytes(be->gpu, cfg, B, o->decode_len) / 2;
    if (!err && cache) err = mt_alloc(&m->kcache, cache, MT_MEM_ACTIVATIONS, place);
    if (!err && cache) err = mt_alloc(&m->vcache, cache, MT_MEM_ACTIVATIONS, place);
    size_t att = o->decode_len ? 0 : attention_workspace(be, cfg, o);  // decoding's attention needs none
    if (!err) err = mt_backend_reserve_workspace(be, scratch_bytes(be->gpu, cfg, o, att));
    if (err) {
        mt_model_free(m);
        return err;
    }
    layout_activations(m, (uintptr_t)m->act_block);
    bind_params(m);
    char *nf4 = m->nf4_storage;
    for (int l = 0; l < cfg->L && m->quantized; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) {
            if (mt_lora_fused_part(cfg, t)) continue;
            size_t n = m->params[linear_param(m, l, t)].count;
            mt_nf4_bind(&m->layers[l].q[lora_base_param[t]], nf4, n);
            nf4 += mt_nf4_storage_bytes(n);
        }
    for (int l = 0; l < cfg->L; l++) {
        memcpy(m->layers[l].home, m->layers[l].w, sizeof m->layers[l].home);
        memcpy(m->layers[l].qh, m->layers[l].q, sizeof m->layers[l].qh);
    }
    if (m->streamed) bind_outer(m);
    // rope tables, computed on the host in fp32 as transformers does
    int half = cfg->D / 2;
    int R = rope_rows(m);
    float *cs = malloc((size_t)R * half * 8);
    MT_CHECK(cs, "rope tables");
    for (int kind = 0; kind <= (cfg->global_every > 0); kind++) {  // global, then Gemma's sliding layers'
        mt_model_rope_tables(cfg, kind, R, cs, cs + (size_t)R * half);
        mt_backend_from_host(be, kind ? m->cos_local : m->cos_table, cs, (size_t)R * half * 4);
        mt_backend_from_host(be, kind ? m->sin_local : m->sin_table, cs + (size_t)R * half, (size_t)R * half * 4);
    }
    free(cs);
    if (!m->decode_len) mt_model_set_positions(m, NULL);
    *out = m;
    return MT_OK;
}

void mt_model_set_positions(mt_model *m, const int32_t *pos) {
    if (!m->pos) {
        MT_CHECK(pos == NULL, "positions given to a model created without document_mask");
        return;
    }
    size_t N = (size_t)m->B * m->T;
    int32_t *identity = NULL;
    if (!pos) {
        identity = malloc(N * sizeof *identity);
        MT_CHECK(identity != NULL, "positions");
        for (size_t i = 0; i < N; i++) identity[i] = (int32_t)(i % (size_t)m->T);
        pos = identity;
    }
    // the kernels trust them: 0, or the position before plus 1
    for (size_t i = 0; i < N; i++)
        MT_CHECK(pos[i] == 0 || (i % (size_t)m->T > 0 && pos[i] == pos[i - 1] + 1),
                 "position %d at row %zu, column %zu", pos[i], i / (size_t)m->T, i % (size_t)m->T);
    mt_backend_from_host(m->be, m->pos, pos, N * sizeof *pos);
    free(identity);
}

// MeZO's scratch: the widest selected trainable matrix and vector (the
// untied embedding is only gathered: its rows are perturbed in place).
static void perturb_widest(const mt_model *m, const unsigned char *selected, size_t *matrix, size_t *vector) {
    int count = m->frozen ? m->num_adapter_params : m->num_params;
    int wte = find_param(m, "model.embed_tokens.weight"), untied = find_param(m, "lm_head.weight") >= 0;
    *matrix = *vector = 0;
    for (int i = 0; i < count; i++) {
        if (selected && !selected[i]) continue;
        const mt_param_info *p = m->frozen ? &m->adapter_params[i] : &m->params[i];
        int gathered_only = !m->frozen && i == wte && untied;
        size_t *widest = p->ndim == 1 ? vector : matrix;
        if (!gathered_only && p->count > *widest) *widest = p->count;
    }
}

void mt_model_plan_bytes(int gpu, int device, const mt_model_config *cfg, const mt_model_options *o,
                         const unsigned char *perturbed, mt_model_bytes *b, int *attention_cudnn) {
    mt_backend be = {0};
    be.gpu = gpu;
    mt_attention_shape attn = attention_shape(cfg, o, 0), local = attention_shape(cfg, o, 1);
    size_t nf4_bytes, widest_linear, act = gpu ? 2 : 4, N = (size_t)o->B * o->T;
    mt_model *m = model_setup(&be, cfg, o, attn, &nf4_bytes, &widest_linear);
    *b = (mt_model_bytes){0};
    b->weights = m->compute_total * act + (m->quantized ? nf4_bytes + widest_linear * act : 0);
    if (m->streamed) {  // the store in host memory; on the backend the outer tensors, two slots, the resident
        size_t outer, slot;
        streamed_sizes(m, nf4_bytes, &outer, &slot);
        b->weights_host = m->compute_total * act + (m->quantized ? nf4_bytes : 0);
        b->weights = outer + (size_t)(2 + m->resident) * slot + (m->quantized ? widest_linear * act : 0);
        b->weights_streamed = (size_t)(m->cfg.L - m->resident) * (m->layer_compute + m->layer_nf4);
    }
    b->adapters = m->lora.r ? m->adapter_total * act : 0;
    if (!m->frozen && !m->forward_only && !m->grad_ready) b->grads = m->total * sizeof(float);
    if (m->grad_ready) {
        size_streamed_grads(m);
        b->grads = ((m->grads_done ? 2 : 1) * m->grad_stream_count + m->grad_outer_count) * sizeof(float);
    }
    if (m->lora.r && !m->forward_only) b->grads += m->adapter_total * sizeof(float);
    b->activations = layout_activations(m, 0);
    b->activations += mt_model_kv_cache_bytes(gpu, cfg, o->B, o->decode_len);
    size_t input = N * cfg->C * act;
    b->offload_host = m->offload ? (size_t)(cfg->L - 1 - m->kept - m->on_disk) * input : 0;
    b->offload_disk = (size_t)m->on_disk * input;
    int cudnn = 0, cudnn_local = 0;
    if (gpu) {  // decoding reserves no attention workspace (mt_model_create_with)
        int attends = !o->decode_len, both = attends && cfg->global_every;
        size_t att = attends ? mt_attention_planned_workspace_bytes(device, &attn, &cudnn) : 0,
               att_local = both ? mt_attention_planned_workspace_bytes(device, &local, &cudnn_local) : 0;
        b->workspace = scratch_bytes(1, cfg, o, att > att_local ? att : att_local);
        // the fp32 staging of each upload (transient), at most 4 Mi values
        b->staging = (m->total < ((size_t)4 << 20) ? m->total : ((size_t)4 << 20)) * sizeof(float);
    }
    if (m->forward_only) {  // MeZO's perturbation scratch
        size_t wm, wv;
        perturb_widest(m, perturbed, &wm, &wv);
        b->perturbation = (wm + wv) * act;
    }
    if (attention_cudnn) *attention_cudnn = cudnn || cudnn_local;
    mt_model_free(m);
}

mt_err mt_model_create(mt_model **out, mt_backend *be, const mt_model_config *cfg, int B, int T,
                       int activation_checkpointing) {
    mt_model_options o = {.B = B, .T = T, .activation_checkpointing = activation_checkpointing};
    return mt_model_create_with(out, be, cfg, &o);
}

void mt_model_free(mt_model *m) {
    if (!m) return;
    trace_free(m);
    mt_graph_free(m->decode_graph);
    mt_free(&m->weights);
    mt_free((void **)&m->grads);
    mt_free((void **)&m->grad_stream);
    mt_free((void **)&m->grad_outer);
    mt_free(&m->nf4_storage);
    mt_free(&m->outer);
    for (int k = 0; k < 2 && k < m->nslots; k++) mt_free(&m->slots[k]);  // (the resident ones are in one block)
    mt_free(&m->resident_block);
    free(m->slots);
    free(m->slot_layer);
    free(m->store_wb);
    mt_free(&m->dequant);
    mt_free(&m->adapter_weights);
    mt_free((void **)&m->adapter_grads);
    mt_free(&m->act_block);
    mt_free(&m->host_x);
    mt_free(&m->disk_x);
    mt_free(&m->kcache);
    mt_free(&m->vcache);
    mt_free(&m->perturb_matrix);
    mt_free(&m->perturb_vector);
    free(m->perturb_selected);
    free(m->pending_left);
    free(m->tickets);
    free(m->params);
    free(m->adapter_params);
    free(m->compute_offset);
    free(m->param_layer);
    free(m->layer_first);
    free(m->layers);
    free(m->x);
    free(m->x_pair);
    free(m->acts);
    free(m);
}

const mt_model_config *mt_model_get_config(const mt_model *m) { return &m->cfg; }
const mt_param_info *mt_model_params(const mt_model *m, int *count) {
    *count = m->num_params;
    return m->params;
}
size_t mt_model_num_params(const mt_model *m) { return m->total; }
void *mt_model_weights(mt_model *m) { return m->weights; }
float *mt_model_grads(mt_model *m) { return m->grads; }

void mt_model_trainable(mt_model *m, mt_trainable *out) {
    if (m->frozen)
        *out = (mt_trainable){m->adapter_params, m->num_adapter_params, m->adapter_total, m->adapter_weights,
                              m->adapter_grads};
    else
        *out = (mt_trainable){m->params, m->num_params, m->total, m->weights, m->grads};
}

void mt_model_describe_attention(mt_model *m, char *buf, size_t len) {
    char what[200];
    mt_attention_describe(m->be, &m->attn, what, sizeof what);
    char window[96] = "";
    if (m->cfg.global_every && m->attn_local.window)
        snprintf(window, sizeof window, ", sliding window of %d tokens (one layer in %d global)", m->attn_local.window,
                 m->cfg.global_every);
    else if (m->attn.window)
        snprintf(window, sizeof window, ", sliding window of %d tokens", m->attn.window);
    snprintf(buf, len, "%s%s%s", what, window, m->attn.docs ? ", packed documents kept apart" : "");
}

int mt_model_resident_layers(const mt_model *m) { return m->resident; }

size_t mt_model_base_weight_bytes(const mt_model *m) {
    size_t bytes = m->compute_total * mt_act_size(m->be);
    for (int l = 0; l < m->cfg.L && m->quantized; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) bytes += mt_nf4_storage_bytes(m->layers[l].q[lora_base_param[t]].n);
    return bytes;
}

void mt_model_set_dropout_seed(mt_model *m, uint64_t seed) { m->dropout_seed = seed; }

// Moves n values between fp32 host memory and compute weights: host -> compute
// (cast on the GPU) when to_compute, else compute -> host. On the GPU the
// casts go through a small fp32 staging buffer.
static mt_err convert_compute(mt_model *m, void *compute, float *host, size_t n, int to_compute) {
    if (!m->be->gpu) {
        if (to_compute)
            memcpy(compute, host, n * sizeof(float));
        else
            memcpy(host, compute, n * sizeof(float));
        return MT_OK;
    }
    const size_t chunk = (size_t)4 << 20;
    float *staging = NULL;
    mt_err err = mt_alloc((void **)&staging, (n < chunk ? n : chunk) * sizeof(float), MT_MEM_WORKSPACE, MT_DEVICE);
    if (err) return err;
    for (size_t start = 0; start < n; start += chunk) {
        size_t count = n - start < chunk ? n - start : chunk;
        void *at = (char *)compute + start * mt_act_size(m->be);
        if (to_compute) {
            mt_copy_to_device(staging, host + start, count * sizeof(float));
            mt_op_cast_from_f32(m->be, at, staging, count);
        } else {
            mt_op_cast_to_f32(m->be, staging, at, count);
            mt_copy_to_host(host + start, staging, count * sizeof(float));
        }
    }
    mt_free((void **)&staging);
    return MT_OK;
}

static mt_err upload_compute(mt_model *m, void *dst, const float *src, size_t n) {
    return convert_compute(m, dst, (float *)src, n, 1);
}

// The NF4 storage of parameter i (a layer's linear weight in QLoRA), as bound
// in the model's home block.
static mt_nf4 *nf4_home(mt_model *m, int i) {
    int l = m->param_layer[i];
    for (int t = 0; t < MT_LORA_MODULES && l >= 0; t++)
        if (!mt_lora_fused_part(&m->cfg, t) && linear_param(m, l, t) == i) return &m->layers[l].qh[lora_base_param[t]];
    MT_CHECK(0, "parameter %s has no NF4 storage", m->params[i].name);
    return NULL;
}

// Where the backend reads outer parameter i of a streamed base.
static void *outer_of(const mt_model *m, int i) {
    return i == m->index_wte ? m->wte : i == m->index_norm ? m->norm_w : m->lm_w;
}

// Outer parameter i of a streamed base between its place in the store and
// the backend's copy: up (store -> backend) or back.
static void sync_outer(const mt_model *m, int i, int up) {
    size_t act = mt_act_size(m->be), bytes = m->params[i].count * act;
    void *home = (char *)m->weights + m->compute_offset[i] * act;
    if (up)
        mt_backend_from_host(m->be, outer_of(m, i), home, bytes);
    else
        mt_backend_to_host(m->be, home, outer_of(m, i), bytes);
}

mt_err mt_model_set_params(mt_model *m, int first, int count, const float *values) {
    mt_model_flush_update(m);
    m->dequant_layer = m->dequant_param = -1;
    size_t act = mt_act_size(m->be), base = m->params[first].offset;
    if (!m->streamed && !m->quantized) {  // the table's layout: one upload of the span
        const mt_param_info *last = &m->params[first + count - 1];
        return upload_compute(m, (char *)m->weights + m->compute_offset[first] * act, values,
                              last->offset + last->count - base);
    }
    // streamed: the store is written on the host (bf16 by the same rounding
    // as the GPU's cast, NF4 by the CPU's quantizer), the outer tensors go up,
    // once no copy into or out of the store is under way
    // (a changed slot, MeZO's resident layers' above all, goes back first: a
    // part of its layer may be set while the rest keeps the slot's values)
    for (int k = 0; k < m->nslots; k++) write_back(m, k);
    if (m->streamed && m->be->gpu) mt_device_synchronize();
    mt_backend host = {0};
    mt_err err = MT_OK;
    for (int i = first; i < first + count && !err; i++) {
        const float *src = values + (m->params[i].offset - base);
        size_t n = m->params[i].count;
        int l = m->param_layer[i];
        for (int k = 0; k < m->nslots; k++)
            if (m->slot_layer[k] == l && l >= 0) m->slot_layer[k] = -1, m->slot_dirty[k] = 0;
        if (m->compute_offset[i] == SIZE_MAX) {
            mt_nf4 *q = nf4_home(m, i);
            err = mt_nf4_quantize(m->streamed ? &host : m->be, q, src);
            if (!m->streamed) m->layers[l].q[q - m->layers[l].qh] = *q;  // the forward's view is the home one
            continue;
        }
        void *dst = (char *)m->weights + m->compute_offset[i] * act;
        if (!m->streamed)
            err = upload_compute(m, dst, src, n);
        else if (m->be->gpu)
            mt_cast_bf16_ref(dst, src, n);
        else
            memcpy(dst, src, n * sizeof(float));
        if (m->streamed && l < 0) sync_outer(m, i, 1);
    }
    return err;
}

mt_err mt_model_set_weights(mt_model *m, const float *host_params) {
    mt_err err = mt_model_set_params(m, 0, m->num_params, host_params);
    if (!err && m->grads) mt_model_zero_grads(m);
    return err;
}

void mt_model_set_adapters(mt_model *m, const float *host_params) {
    MT_CHECK(m->lora.r > 0, "the model has no adapters");
    mt_model_flush_update(m);
    MT_CHECK(upload_compute(m, m->adapter_weights, host_params, m->adapter_total) == MT_OK,
             "out of device memory staging the adapters");
    if (m->adapter_grads) mt_op_zero(m->be, m->adapter_grads, m->adapter_total * sizeof(float));
}

void mt_model_zero_grads(mt_model *m) {
    mt_trainable t;
    mt_model_trainable(m, &t);
    if (t.grads) mt_op_zero(m->be, t.grads, t.total * sizeof(float));
}

mt_err mt_model_enable_perturbation(mt_model *m, const unsigned char *selected) {
    mt_trainable t;
    mt_model_trainable(m, &t);
    free(m->perturb_selected);
    mt_free(&m->perturb_matrix);
    mt_free(&m->perturb_vector);
    free(m->pending_left);
    m->perturb_selected = malloc((size_t)t.count);
    m->pending_left = calloc((size_t)t.count, 1);
    m->pending = 0;
    MT_CHECK(m->perturb_selected && m->pending_left, "perturbation flags");
    for (int i = 0; i < t.count; i++) m->perturb_selected[i] = selected ? selected[i] != 0 : 1;
    size_t widest_matrix, widest_vector;
    perturb_widest(m, selected, &widest_matrix, &widest_vector);
    mt_mem_place place = m->be->gpu ? MT_DEVICE : MT_HOST;
    size_t act = mt_act_size(m->be);
    mt_err err = MT_OK;
    if (widest_matrix) err = mt_alloc(&m->perturb_matrix, widest_matrix * act, MT_MEM_WORKSPACE, place);
    if (!err && widest_vector) err = mt_alloc(&m->perturb_vector, widest_vector * act, MT_MEM_WORKSPACE, place);
    m->perturb_bytes = (widest_matrix + widest_vector) * act;
    m->perturb_matrix_holds = m->perturb_vector_holds = -1;
    // the mirrors' room: past the widest selected layer matrix, 16-byte aligned
    size_t layer_widest = 0;
    for (int i = 0; i < t.count && !m->frozen; i++) {
        const mt_param_info *p = &m->params[i];
        if (m->perturb_selected[i] && p->ndim > 1 && m->param_layer[i] >= 0 && p->count > layer_widest)
            layer_widest = p->count;
    }
    const char *env = getenv("MT_MEZO_MIRROR");
    m->mirror_from = (layer_widest + 7) / 8 * 8;
    m->mirror_room = m->frozen || (env && strcmp(env, "0") == 0) || widest_matrix < m->mirror_from
                         ? 0
                         : widest_matrix - m->mirror_from;
    m->mirrors = 0, m->mirror_recording = 0;
    return err;
}

size_t mt_model_mirror_saved(const mt_model *m) { return m->mirror_saved; }

void mt_model_set_perturbation(mt_model *m, uint64_t seed, float scale) {
    MT_CHECK(m->perturb_selected || scale == 0.0f, "perturbation set before mt_model_enable_perturbation");
    m->perturb_seed = seed;
    m->perturb_scale = scale;
    m->perturb_matrix_holds = m->perturb_vector_holds = -1;
}

size_t mt_model_perturbation_bytes(const mt_model *m) { return m->perturb_bytes; }

static const mt_param_info *trainable_param(const mt_model *m, int i) {
    return m->frozen ? &m->adapter_params[i] : &m->params[i];
}

// Where trainable parameter i is written (MeZO's update). A streamed base's
// layer weight is in the slot holding its layer (which must be there; the
// slot is then marked changed), the outer tensors on the backend.
static void *trainable_weight(mt_model *m, int i) {
    size_t act = mt_act_size(m->be);
    if (m->frozen || !m->streamed) {
        void *block = m->frozen ? m->adapter_weights : m->weights;
        return (char *)block + trainable_param(m, i)->offset * act;
    }
    int l = m->param_layer[i];
    if (l < 0) return outer_of(m, i);
    int k = slot_of(m, l);
    MT_CHECK(k >= 0, "layer %d's weights written while not in a slot", l);
    m->slot_dirty[k] = 1;
    return (char *)m->slots[k] + (m->compute_offset[i] - layer_start(m, l)) * act;
}

static float pending_decay(const mt_model *m, int i) { return trainable_param(m, i)->decay ? m->pending_decay : 0.0f; }

// Whether trainable parameter i still owes the deferred update; it is then
// marked as paid (the caller applies it).
static int take_pending(mt_model *m, int i) {
    if (!m->pending || !m->pending_left[i]) return 0;
    m->pending_left[i] = 0;
    m->pending--;
    return 1;
}

// Applies the deferred update to trainable parameter i, alone.
static void apply_pending(mt_model *m, int i) {
    if (!take_pending(m, i)) return;
    const mt_param_info *p = trainable_param(m, i);
    mt_op_zo_update(m->be, trainable_weight(m, i), p->count, p->offset, &m->pending_directions, m->pending_lr,
                    pending_decay(m, i), m->pending_round_seed);
}

void mt_model_flush_update(mt_model *m) {
    mt_trainable t;
    mt_model_trainable(m, &t);
    // a streamed base: each layer that owes its update through a slot
    for (int l = 0; l < m->cfg.L && m->pending && m->streamed && !m->frozen; l++) {
        int owes = 0;
        for (int i = 0; i < t.count && !owes; i++) owes = m->param_layer[i] == l && m->pending_left[i];
        if (!owes) continue;
        stream_layer(m, l, -2);  // (outside a pass)
        for (int i = 0; i < t.count; i++)
            if (m->param_layer[i] == l) apply_pending(m, i);
    }
    for (int i = 0; i < t.count && m->pending; i++) apply_pending(m, i);
}

void mt_model_defer_update(mt_model *m, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed) {
    MT_CHECK(m->perturb_selected, "update deferred before mt_model_enable_perturbation");
    mt_model_flush_update(m);
    mt_trainable t;
    mt_model_trainable(m, &t);
    m->pending_directions = *d;
    m->pending_lr = lr, m->pending_decay = weight_decay, m->pending_round_seed = round_seed;
    for (int i = 0; i < t.count; i++) {
        m->pending_left[i] = m->perturb_selected[i];
        m->pending += m->pending_left[i];
    }
}

// A streamed base as it stands: changed slots and the outer tensors back in
// the store, then the store as fp32.
static void read_streamed(mt_model *m, float *dst) {
    for (int k = 0; k < m->nslots; k++) write_back(m, k);
    if (m->be->gpu) mt_device_synchronize();  // every write-back landed (the copies below wait for none)
    sync_outer(m, m->index_wte, 0);
    sync_outer(m, m->index_norm, 0);
    if (m->index_lm != m->index_wte) sync_outer(m, m->index_lm, 0);
    if (!m->be->gpu) {
        memcpy(dst, m->weights, m->total * sizeof(float));
        return;
    }
    const uint16_t *store = m->weights;
    for (size_t j = 0; j < m->total; j++) dst[j] = mt_bf16_to_f32(store[j]);
}

void mt_model_get_trainable(mt_model *m, float *dst) {
    if (m->streamed && !m->frozen) {
        mt_model_flush_update(m);
        read_streamed(m, dst);
        return;
    }
    mt_trainable t;
    mt_model_trainable(m, &t);
    MT_CHECK(mt_model_get_trainable_range(m, 0, t.total, dst) == MT_OK,
             "out of device memory reading the weights back");
}

mt_err mt_model_get_trainable_range(mt_model *m, size_t offset, size_t count, float *dst) {
    MT_CHECK(!(m->streamed && !m->frozen), "mt_model_get_trainable_range: the weights are streamed");
    mt_model_flush_update(m);
    mt_trainable t;
    mt_model_trainable(m, &t);
    MT_CHECK(offset + count <= t.total, "trainable range [%zu, %zu) of %zu", offset, offset + count, t.total);
    return convert_compute(m, (char *)t.weights + offset * mt_act_size(m->be), dst, count, 0);
}

// ------------------------------------------------------- forward/backward

static layer_acts *acts_of(mt_model *m, int l) { return &m->acts[m->checkpointing || m->forward_only ? 0 : l]; }

static void *rows(const mt_model *m, void *base, size_t row, size_t width) {
    return (char *)base + row * width * mt_act_size(m->be);
}

// The base weight p of layer l for a matmul: its compute copy, or with NF4
// the shared buffer, dequantized unless it already holds that weight.
static const void *base_weight(mt_model *m, int l, int p) {
    int whole;
    size_t off;
    if (m->quantized && fused_part(&m->cfg, p, &whole, &off))  // Phi-3: a block of the dequantized whole
        return (const char *)base_weight(m, l, whole) + off * mt_act_size(m->be);
    if (!m->quantized || m->layers[l].w[p] || !m->layers[l].q[p].n) return m->layers[l].w[p];
    if (m->dequant_layer != l || m->dequant_param != p) {
        mt_nf4_dequantize(m->be, m->dequant, &m->layers[l].q[p]);
        m->dequant_layer = l, m->dequant_param = p;
    }
    return m->dequant;
}

// Element `at` of the mirrors' room.
static void *mirror_ptr(const mt_model *m, size_t at) {
    return (char *)m->perturb_matrix + (m->mirror_from + at) * mt_act_size(m->be);
}

// The - pass of a pair: trainable tensor i as the + pass mirrored it (NULL:
// not mirrored).
static const void *mirrored(const mt_model *m, int i) {
    for (int k = 0; k < m->mirrors && !m->mirror_recording; k++)
        if (m->mirror_index[k] == i) return mirror_ptr(m, m->mirror_at[k]);
    return NULL;
}

// The + pass of a pair: room for trainable tensor i's mirror (NULL: none
// left, or mirrored already by an earlier read of this pass), in the order
// the layer reads its tensors.
static void *mirror_room(mt_model *m, int i, size_t count) {
    if (!m->mirror_recording || m->mirrors == MIRRORS || m->mirror_used + count > m->mirror_room) return NULL;
    for (int k = 0; k < m->mirrors; k++)
        if (m->mirror_index[k] == i) return NULL;
    m->mirror_index[m->mirrors] = i;
    m->mirror_at[m->mirrors++] = m->mirror_used;
    void *at = mirror_ptr(m, m->mirror_used);
    m->mirror_used += (count + 7) / 8 * 8;
    m->mirror_saved++;
    return at;
}

// A pair's layer: its + pass records mirrors (recording 1), its - pass
// reads them (0); -1 forgets them.
static void mirror_phase(mt_model *m, int recording) {
    if (recording) m->mirrors = 0, m->mirror_used = 0;
    m->mirror_recording = recording > 0;
}

// What the forward reads for trainable parameter i stored at w: w itself, or
// under a MeZO perturbation w + scale z, generated into the scratch buffer of
// its kind unless that already holds it (or, in a pair's - pass, the + pass
// mirrored it).
static const void *perturbed(mt_model *m, int i, const void *w) {
    if (m->perturb_scale == 0.0f || i < 0 || !m->perturb_selected[i]) return w;
    const mt_param_info *p = trainable_param(m, i);
    int vector = p->ndim == 1;
    const void *kept = mirrored(m, i);
    if (kept) return kept;
    void *buf = vector ? m->perturb_vector : m->perturb_matrix;
    int *holds = vector ? &m->perturb_vector_holds : &m->perturb_matrix_holds;
    if (*holds != i) {
        void *mirror = mirror_room(m, i, p->count);
        if (take_pending(m, i)) {
            // the deferred update and this read's perturbation in one pass
            mt_op_zo_update_perturb(m->be, trainable_weight(m, i), buf, mirror, p->count, p->offset,
                                    &m->pending_directions, m->pending_lr, pending_decay(m, i), m->pending_round_seed,
                                    m->perturb_scale, m->perturb_seed);
        } else {
            mt_op_perturb_pair(m->be, buf, mirror, w, p->count, m->perturb_scale, m->perturb_seed, p->offset);
        }
        *holds = i;
    }
    return buf;
}

// Base parameter p of layer l as the forward reads it (NF4 dequantized,
// perturbed when trainable and selected).
static const void *layer_weight(mt_model *m, int l, int p) {
    int whole;
    size_t off;
    if (m->perturb_scale != 0.0f && fused_part(&m->cfg, p, &whole, &off))  // a block of the perturbed whole
        return (const char *)layer_weight(m, l, whole) + off * mt_act_size(m->be);
    const void *w = base_weight(m, l, p);
    return w && !m->frozen ? perturbed(m, m->layers[l].index[p], w) : w;
}

static const void *lm_weight(mt_model *m) { return m->frozen ? m->lm_w : perturbed(m, m->index_lm, m->lm_w); }

// Whether the base weights the forward reads stay where they are stored: an
// NF4 base dequantizes, and a MeZO perturbation generates, each weight into
// one scratch buffer, which the next weight overwrites.
static int weights_stay_put(const mt_model *m) { return !m->quantized && m->perturb_scale == 0.0f; }

// The base products of one input (q, k and v; gate and up): weights w[k] and
// biases b[k] (-1: none) of layer l into out[k] (N, OUT[k]). One op where the
// weights stay put; otherwise each product runs as soon as its weight is there.
static void base_products(mt_model *m, int l, const int *w, const int *b, void **out, const int *OUT, int count,
                          const void *inp, int N, int IN) {
    int together = weights_stay_put(m);
    mt_product p[MT_MAX_PRODUCTS];
    for (int k = 0; k < count; k++) {
        p[k] = (mt_product){out[k], layer_weight(m, l, w[k]), b[k] >= 0 ? layer_weight(m, l, b[k]) : NULL, OUT[k]};
        if (!together) mt_op_matmul_forward(m->be, p[k].out, inp, p[k].weight, p[k].bias, N, IN, p[k].OUT);
    }
    if (together) mt_op_matmul_forward_many(m->be, p, count, inp, N, IN);
}

// Adapters that read one input share one dropout mask, drawn and applied
// once forward and once backward: q, k and v (the attention's norm), gate and
// up (the MLP's); a fused module's parts (Phi-3) are such groups too. The
// mask's seed is the group's first module's.
static int drop_group(int t) {
    return t == MT_LORA_K || t == MT_LORA_V ? MT_LORA_Q : t == MT_LORA_UP ? MT_LORA_GATE : t;
}

static uint64_t dropout_seed(const mt_model *m, int l, int t) {
    return mt_rng_bits(m->dropout_seed, (uint64_t)l * MT_LORA_MODULES + (uint64_t)drop_group(t));
}

// The adapters see rows r0..r0+R of the batch (all N rows, or a tile of the
// MLP's): x, y, dx and dy point at those rows; their u rows and dropout mask
// are those rows' part of the whole batch's.

// The dropout probability a pass applies (0 outside training).
static float dropout_p(const mt_model *m) { return m->drop_buf && m->training ? m->lora.dropout : 0.0f; }

// Where adapter t's du (R, r) waits until its group's backward through A
// (lora_input_backward): the group's first in lora_du; the later ones beside
// the (R, IN) room for dropout(x) in drop_buf, or without dropout in f1 (free
// once the MLP's activation backward has read it) where it holds them, else
// in lora_du's further slots.
static void *lora_du_of(mt_model *m, int t, int IN, int R) {
    size_t slot = (size_t)(t - drop_group(t)), r = (size_t)m->lora.r;
    if (slot == 0) return m->lora_du;
    if (m->drop_buf && m->training) return rows(m, m->drop_buf, 1, (size_t)R * IN + (slot - 1) * R * r);
    if (m->du_in_f1) return rows(m, m->f1, 1, (slot - 1) * R * r);
    return rows(m, m->lora_du, 1, slot * R * r);
}

// Scratch for the LoRA ops of an (R, IN) input: drop_buf's room for
// dropout(x) with dropout; without, f1 past the du kept there, unless f1 is
// busy (down_proj's input gradient) or absent (forward only: none).
static void *lora_scratch(mt_model *m, const void *busy, int IN, int R, size_t *bytes) {
    size_t a = mt_act_size(m->be);
    *bytes = 0;
    if (m->drop_buf && m->training) return *bytes = (size_t)R * IN * a, m->drop_buf;
    if (!m->f1 || m->f1 == busy) return NULL;
    size_t kept = m->du_in_f1 ? 2 * (size_t)m->B * m->T * m->lora.r : 0, room = (size_t)m->mlp_rows * m->cfg.F;
    *bytes = (room - kept) * a;
    return rows(m, m->f1, 1, kept);
}

// u = A dropout(x) (its R rows) of adapters t0..t1, which read one input x
// (R, IN) and share one mask: one op where their A stay put (a MeZO
// perturbation generates each into one scratch buffer: then one op each).
static void lora_down(mt_model *m, int l, int t0, int t1, const void *x, int IN, int r0, int R) {
    layer_params *P = &m->layers[l];
    void *u[MT_MAX_PRODUCTS];
    const void *a[MT_MAX_PRODUCTS];
    size_t bytes;
    void *scratch = lora_scratch(m, NULL, IN, R, &bytes);
    int n = 0, each = m->perturb_scale != 0.0f;
    for (int t = t0; t <= t1; t++) {
        if (P->lora_a[t]) {
            u[n] = rows(m, acts_of(m, l)->lora_u[t], (size_t)r0, (size_t)m->lora.r);
            a[n++] = perturbed(m, P->lora_index_a[t], P->lora_a[t]);
        }
        if (!n || (!each && t < t1)) continue;
        mt_op_lora_down(m->be, u, a, n, x, scratch, bytes, R, IN, m->lora.r, dropout_p(m), dropout_seed(m, l, t0),
                        (uint64_t)r0 * IN);
        n = 0;
    }
}

// y (R, OUT) += scale * B u, u from lora_down.
static void lora_forward(mt_model *m, int l, int t, void *y, int OUT, int r0, int R) {
    layer_params *P = &m->layers[l];
    if (!P->lora_a[t]) return;
    int r = m->lora.r;
    void *u = rows(m, acts_of(m, l)->lora_u[t], (size_t)r0, (size_t)r);
    // a fused module's part: its rows of the whole B (MeZO perturbs the whole)
    int owner = mt_lora_fused_owner(&m->cfg, t);
    const void *whole = perturbed(m, P->lora_index_b[t], P->lora_b[owner]);
    const void *b = (const char *)whole + ((const char *)P->lora_b[t] - (const char *)P->lora_b[owner]);
    mt_op_matmul_forward_add(m->be, y, u, b, R, r, OUT, m->lora_scale);
}

// From dy (R, OUT): B's gradient, and du = scale dy B (R, r) into
// lora_du_of, where it waits for lora_input_backward.
static void lora_backward(mt_model *m, int l, int t, const void *dy, int IN, int OUT, int r0, int R) {
    layer_params *P = &m->layers[l];
    if (!P->lora_a[t]) return;
    const void *u = rows(m, acts_of(m, l)->lora_u[t], (size_t)r0, (size_t)m->lora.r);
    mt_op_matmul_backward_scaled(m->be, lora_du_of(m, t, IN, R), P->glora_b[t], dy, u, P->lora_b[t], R, m->lora.r, OUT,
                                 m->lora_scale, 0);
}

// The backward through A of the adapters of the group that ends at module t,
// which read x (R, IN): each one's dA += du^T dropout(x), and dx (R, IN),
// which holds the base's part, += dropout's backward (their one mask) of the
// sum of du A over them.
static void lora_input_backward(mt_model *m, int l, int t, void *dx, const void *x, int IN, int r0, int R) {
    layer_params *P = &m->layers[l];
    const void *du[MT_MAX_PRODUCTS], *a[MT_MAX_PRODUCTS];
    float *da[MT_MAX_PRODUCTS];
    int n = 0;
    for (int s = drop_group(t); s <= t; s++)
        if (P->lora_a[s]) du[n] = lora_du_of(m, s, IN, R), da[n] = P->glora_a[s], a[n++] = P->lora_a[s];
    if (!n) return;
    size_t bytes;
    void *scratch = lora_scratch(m, dx, IN, R, &bytes);
    mt_op_lora_down_backward(m->be, dx, da, du, a, n, x, scratch, bytes, R, IN, m->lora.r, dropout_p(m),
                             dropout_seed(m, l, t), (uint64_t)r0 * IN);
}

// The MLP's gate activation: Gemma's tanh GELU, else SiLU.
static mt_act glu_act(const mt_model_config *c) { return c->gemma ? MT_ACT_GELU_TANH : MT_ACT_SILU; }

// The MLP over rows r0..r0+R of the batch (all N, or a tile: model option
// mlp_tile_rows): gate and up into A->gate and A->up (R rows), and unless d
// is NULL act(gate) * up into f0 and down_proj's output into d's rows.
static void mlp_rows_forward(mt_model *m, int l, int r0, int R, void *d) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    layer_acts *A = acts_of(m, l);
    const void *ln2 = rows(m, A->ln2, (size_t)r0, (size_t)c->C);
    const layer_params *P = &m->layers[l];
    // forward only, no adapters on gate and up, weights that stay put: the
    // products and the activation in one op (gate and up are not kept)
    if (d && m->forward_only && !P->lora_a[MT_LORA_GATE] && !P->lora_a[MT_LORA_UP] && weights_stay_put(m)) {
        mt_op_matmul_glu_forward(be, m->f0, A->gate, A->up, ln2, layer_weight(m, l, P_WG), layer_weight(m, l, P_WU), R,
                                 c->C, c->F, glu_act(c));
    } else {
        void *gate_up[2] = {A->gate, A->up};
        base_products(m, l, (const int[]){P_WG, P_WU}, (const int[]){-1, -1}, gate_up, (const int[]){c->F, c->F}, 2,
                      ln2, R, c->C);
        lora_down(m, l, MT_LORA_GATE, MT_LORA_UP, ln2, c->C, r0, R);
        lora_forward(m, l, MT_LORA_GATE, A->gate, c->F, r0, R);
        lora_forward(m, l, MT_LORA_UP, A->up, c->F, r0, R);
        if (!d) return;
        mt_op_glu_forward(be, m->f0, A->gate, A->up, (size_t)R * c->F, glu_act(c));
    }
    void *dr = rows(m, d, (size_t)r0, (size_t)c->C);
    mt_op_matmul_forward(be, dr, m->f0, layer_weight(m, l, P_WD), NULL, R, c->F, c->C);
    lora_down(m, l, MT_LORA_DOWN, MT_LORA_DOWN, m->f0, c->F, r0, R);
    lora_forward(m, l, MT_LORA_DOWN, dr, c->C, r0, R);
}

// Rows in the MLP tile starting at row r0.
static int tile_rows(const mt_model *m, int r0) {
    int N = m->B * m->T;
    return N - r0 < m->mlp_rows ? N - r0 : m->mlp_rows;
}

// Decoding: the rows' new keys and values into layer l's caches, then each
// row's queries over its cached positions (Gemma's sliding layers and
// Mistral's window: the window's last positions only).
static void decode_attention(mt_model *m, int l, layer_acts *A) {
    const mt_model_config *c = &m->cfg;
    size_t per_layer = (size_t)m->B * c->KV * m->decode_len * c->D;
    void *kc = rows(m, m->kcache, (size_t)l, per_layer), *vc = rows(m, m->vcache, (size_t)l, per_layer);
    int sliding = c->global_every == 0 || mt_layer_local(c, l);
    int window = sliding && c->sliding_window > 0 ? (int)c->sliding_window : 0;
    mt_op_kv_store(m->be, kc, vc, A->k, A->v, m->pos, m->B, c->KV, c->D, m->decode_len);
    mt_op_attention_decode(m->be, A->atty, A->q, kc, vc, m->pos, m->B, c->H, c->KV, c->D, m->decode_len, window,
                           c->attn_scale);
}

// Layer l from x[l]; writes x[l+1] unless `recompute` (then it stops once
// everything backward needs is there).
static void layer_forward(mt_model *m, int l, int recompute) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    int N = m->B * m->T, HD = c->H * c->D, KVD = c->KV * c->D;
    layer_acts *A = acts_of(m, l);
    void *qf = m->qkv_flat, *kf = rows(m, qf, (size_t)N, (size_t)HD), *vf = rows(m, kf, (size_t)N, (size_t)KVD);
    int g = c->gemma, local = mt_layer_local(c, l);
    const float *cs = local ? m->cos_local : m->cos_table, *sn = local ? m->sin_local : m->sin_table;
    mt_op_rmsnorm_forward(be, A->ln1, A->rstd1, m->x[l], layer_weight(m, l, P_LN1), N, c->C, c->rms_eps, g);
    // Qwen3: the projections stay for backward; each head's norm writes what RoPE reads
    void *qp = c->qk_norm ? A->qraw : qf, *kp = c->qk_norm ? A->kraw : kf;
    void *qkv[3] = {qp, kp, vf};
    base_products(m, l, (const int[]){P_WQ, P_WK, P_WV}, (const int[]){P_BQ, P_BK, P_BV}, qkv,
                  (const int[]){HD, KVD, KVD}, 3, A->ln1, N, c->C);
    lora_down(m, l, MT_LORA_Q, MT_LORA_V, A->ln1, c->C, 0, N);
    lora_forward(m, l, MT_LORA_Q, qp, HD, 0, N);
    lora_forward(m, l, MT_LORA_K, kp, KVD, 0, N);
    lora_forward(m, l, MT_LORA_V, vf, KVD, 0, N);
    if (c->qk_norm) {
        mt_op_rmsnorm_forward(be, qf, A->rstd_q, qp, layer_weight(m, l, P_QN), N * c->H, c->D, c->rms_eps, g);
        mt_op_rmsnorm_forward(be, kf, A->rstd_k, kp, layer_weight(m, l, P_KN), N * c->KV, c->D, c->rms_eps, g);
    }
    mt_rope_part qkv_rope[3] = {{A->q, qf, c->H, 1}, {A->k, kf, c->KV, 1}, {A->v, vf, c->KV, 0}};
    mt_op_rope_forward_many(be, qkv_rope, 3, cs, sn, m->pos, m->B, m->T, c->D);
    if (m->decode_len)
        decode_attention(m, l, A);
    else
        mt_op_attention_forward(be, local ? &m->attn_local : &m->attn, A->atty, A->lse, A->q, A->k, A->v, m->pos);
    // Gemma: o_proj's output is kept and normalised before the residual
    void *o = g ? A->attn_out : m->scratch_c;
    mt_op_matmul_forward(be, o, A->atty, layer_weight(m, l, P_WO), layer_weight(m, l, P_BO), N, HD, c->C);
    lora_down(m, l, MT_LORA_O, MT_LORA_O, A->atty, HD, 0, N);
    lora_forward(m, l, MT_LORA_O, o, c->C, 0, N);
    if (g) mt_op_rmsnorm_forward(be, m->scratch_c, A->rstd_a, o, layer_weight(m, l, P_ANORM), N, c->C, c->rms_eps, 1);
    mt_op_add_rmsnorm_forward(be, A->x2, A->ln2, A->rstd2, m->x[l], m->scratch_c, layer_weight(m, l, P_LN2), N, c->C,
                              c->rms_eps, g);
    // the MLP, whole or in tiles of rows; Gemma's backward needs down_proj's
    // output for its norm: recompute reaches it
    void *d = g ? A->mlp_out : m->scratch_c;
    if (!m->mlp_tiled) {
        mlp_rows_forward(m, l, 0, N, recompute && !g ? NULL : d);
        if (recompute && !g) return;
    } else {
        if (recompute && !g) return;  // backward recomputes each tile
        for (int r0 = 0; r0 < N; r0 += m->mlp_rows) mlp_rows_forward(m, l, r0, tile_rows(m, r0), d);
    }
    if (g) mt_op_rmsnorm_forward(be, m->scratch_c, A->rstd_f, d, layer_weight(m, l, P_FNORM), N, c->C, c->rms_eps, 1);
    if (recompute) return;  // x[l+1] is kept (and its slot may hold another layer's input)
    mt_op_add(be, m->x[l + 1], A->x2, m->scratch_c, (size_t)N * c->C);
}

// Gemma: d(loss)/d(the norm's input) into scratch_c (free in backward) from
// d(loss)/d(its output) = dres, through the norm of `in` (rstd) by weight p.
static void *sandwich_backward(mt_model *m, int l, int p, const void *in, const float *rstd) {
    const mt_model_config *c = &m->cfg;
    layer_params *P = &m->layers[l];
    size_t N = (size_t)m->B * m->T;
    mt_op_zero(m->be, m->scratch_c, N * c->C * mt_act_size(m->be));
    mt_op_rmsnorm_backward(m->be, m->scratch_c, P->g[p], m->dres, in, P->w[p], rstd, (int)N, c->C, 1);
    return m->scratch_c;
}

// The MLP's backward over rows r0..r0+R, from gate and up of those rows (in
// A->gate, A->up) and dmlp (N, C): its weights' gradients added, and the
// rows' d(loss)/d(ln2) into dln's rows.
static void mlp_rows_backward(mt_model *m, int l, const void *dmlp, int r0, int R) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    layer_params *P = &m->layers[l];
    layer_acts *A = acts_of(m, l);
    size_t RF = (size_t)R * c->F;
    mt_op_glu_forward(be, m->f0, A->gate, A->up, RF, glu_act(c));
    // the recompute stopped before down_proj (or a tile's was not kept): its adapter's u again
    if (m->mlp_tiled || (m->checkpointing && !c->gemma))
        lora_down(m, l, MT_LORA_DOWN, MT_LORA_DOWN, m->f0, c->F, r0, R);
    const void *dy = rows(m, (void *)dmlp, (size_t)r0, (size_t)c->C), *ln2 = rows(m, A->ln2, (size_t)r0, (size_t)c->C);
    void *dln = rows(m, m->dln, (size_t)r0, (size_t)c->C);
    mt_op_matmul_backward(be, m->f1, P->g[P_WD], NULL, dy, m->f0, base_weight(m, l, P_WD), R, c->F, c->C, 0);
    lora_backward(m, l, MT_LORA_DOWN, dy, c->F, c->C, r0, R);
    lora_input_backward(m, l, MT_LORA_DOWN, m->f1, m->f0, c->F, r0, R);
    // up's gradient replaces up itself (read first, element by element)
    void *dup = A->up;
    mt_op_glu_backward(be, m->f0, dup, m->f1, A->gate, A->up, RF, glu_act(c));
    mt_op_matmul_backward(be, dln, P->g[P_WG], NULL, m->f0, ln2, base_weight(m, l, P_WG), R, c->C, c->F, 0);
    lora_backward(m, l, MT_LORA_GATE, m->f0, c->C, c->F, r0, R);
    mt_op_matmul_backward(be, dln, P->g[P_WU], NULL, dup, ln2, base_weight(m, l, P_WU), R, c->C, c->F, 1);
    lora_backward(m, l, MT_LORA_UP, dup, c->C, c->F, r0, R);
    lora_input_backward(m, l, MT_LORA_UP, dln, ln2, c->C, r0, R);
}

// Adds layer l's gradients; dres holds d(loss)/d(x[l+1]) on entry and
// d(loss)/d(x[l]) on exit.
static void layer_backward(mt_model *m, int l) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    int N = m->B * m->T, HD = c->H * c->D, KVD = c->KV * c->D;
    layer_params *P = &m->layers[l];
    layer_acts *A = acts_of(m, l);
    int g = c->gemma, local = mt_layer_local(c, l);
    const float *cs = local ? m->cos_local : m->cos_table, *sn = local ? m->sin_local : m->sin_table;
    if (m->checkpointing) layer_forward(m, l, 1);
    // Gemma: through the MLP output's norm first
    void *dmlp = g ? sandwich_backward(m, l, P_FNORM, A->mlp_out, A->rstd_f) : m->dres;
    if (!m->mlp_tiled) {
        mlp_rows_backward(m, l, dmlp, 0, N);
    } else {
        for (int r0 = 0; r0 < N; r0 += m->mlp_rows) {
            mlp_rows_forward(m, l, r0, tile_rows(m, r0), NULL);
            mlp_rows_backward(m, l, dmlp, r0, tile_rows(m, r0));
        }
    }
    mt_op_rmsnorm_backward(be, m->dres, P->g[P_LN2], m->dln, A->x2, P->w[P_LN2], A->rstd2, N, c->C, g);
    // x2 and ln2 are free from here
    void *dattn = g ? sandwich_backward(m, l, P_ANORM, A->attn_out, A->rstd_a) : m->dres,
         *datty = m->datty_in_x2 ? A->x2 : m->datty;
    mt_op_matmul_backward(be, datty, P->g[P_WO], P->g[P_BO], dattn, A->atty, base_weight(m, l, P_WO), N, HD, c->C, 0);
    lora_backward(m, l, MT_LORA_O, dattn, HD, c->C, 0, N);
    lora_input_backward(m, l, MT_LORA_O, datty, A->atty, HD, 0, N);
    mt_op_attention_backward(be, local ? &m->attn_local : &m->attn, m->dq, m->dk, m->dv, datty, A->q, A->k, A->v,
                             A->atty, A->lse, m->pos);
    void *dqf = m->dqkv_in_x2 ? A->x2 : m->dqkv_flat, *dkf = rows(m, dqf, (size_t)N, (size_t)HD),
         *dvf = rows(m, dkf, (size_t)N, (size_t)KVD);
    mt_op_rope_backward(be, dqf, m->dq, cs, sn, m->pos, m->B, m->T, c->H, c->D, 1);
    mt_op_rope_backward(be, dkf, m->dk, cs, sn, m->pos, m->B, m->T, c->KV, c->D, 1);
    mt_op_rope_backward(be, dvf, m->dv, cs, sn, m->pos, m->B, m->T, c->KV, c->D, 0);
    if (c->qk_norm) {
        // through each head's norm, into dq and dk (free once RoPE's backward has read them)
        size_t a = mt_act_size(be);
        mt_op_zero(be, m->dq, (size_t)N * HD * a);
        mt_op_zero(be, m->dk, (size_t)N * KVD * a);
        mt_op_rmsnorm_backward(be, m->dq, P->g[P_QN], dqf, A->qraw, P->w[P_QN], A->rstd_q, N * c->H, c->D, g);
        mt_op_rmsnorm_backward(be, m->dk, P->g[P_KN], dkf, A->kraw, P->w[P_KN], A->rstd_k, N * c->KV, c->D, g);
        dqf = m->dq, dkf = m->dk;
    }
    mt_op_matmul_backward(be, m->dln, P->g[P_WQ], P->g[P_BQ], dqf, A->ln1, base_weight(m, l, P_WQ), N, c->C, HD, 0);
    lora_backward(m, l, MT_LORA_Q, dqf, c->C, HD, 0, N);
    mt_op_matmul_backward(be, m->dln, P->g[P_WK], P->g[P_BK], dkf, A->ln1, base_weight(m, l, P_WK), N, c->C, KVD, 1);
    lora_backward(m, l, MT_LORA_K, dkf, c->C, KVD, 0, N);
    mt_op_matmul_backward(be, m->dln, P->g[P_WV], P->g[P_BV], dvf, A->ln1, base_weight(m, l, P_WV), N, c->C, KVD, 1);
    lora_backward(m, l, MT_LORA_V, dvf, c->C, KVD, 0, N);
    lora_input_backward(m, l, MT_LORA_V, m->dln, A->ln1, c->C, 0, N);
    // with a frozen embedding nothing needs d(loss)/d(x[0])
    if (l > 0 || !m->frozen)
        mt_op_rmsnorm_backward(be, m->dres, P->g[P_LN1], m->dln, m->x[l], P->w[P_LN1], A->rstd1, N, c->C, g);
}

static void upload_tokens(mt_model *m, const int32_t *inputs, const int32_t *targets) {
    size_t bytes = (size_t)m->B * m->T * sizeof(int32_t);
    mt_backend_from_host(m->be, m->tokens, inputs, bytes);
    if (targets) mt_backend_from_host(m->be, m->targets, targets, bytes);
}

// Whether x[l] goes to host memory between forward and backward (x[L-1] never leaves).
static int offloaded(const mt_model *m, int l) { return m->offload && l >= m->kept && l <= m->cfg.L - 2; }

// Offload: x[l]'s host copy (in pinned memory, or in the file for the last
// on_disk), and x[l] to or from it beside the compute.
static void *host_x(const mt_model *m, int l) {
    size_t input = (size_t)m->B * m->T * m->cfg.C * mt_act_size(m->be);
    int i = l - m->kept, in_host = m->cfg.L - 1 - m->kept - m->on_disk;  // the last on_disk in the file
    return i < in_host ? (char *)m->host_x + (size_t)i * input : (char *)m->disk_x + (size_t)(i - in_host) * input;
}

static void move_x(mt_model *m, int l, int to_host) {
    size_t bytes = (size_t)m->B * m->T * m->cfg.C * mt_act_size(m->be);
    void *dst = to_host ? host_x(m, l) : m->x[l], *src = to_host ? m->x[l] : host_x(m, l);
    if (m->be->gpu)
        m->tickets[l] = mt_copy_async(dst, src, bytes);
    else
        memcpy(dst, src, bytes);
}

static void wait_x(const mt_model *m, int l) {
    if (m->be->gpu) mt_copy_async_wait(m->tickets[l]);
}

static void weights_needed(const mt_model *m, int bucket) {
    if (m->weights_needed) m->weights_needed(m->weights_needed_ctx, bucket);
    // a streamed base trained by the offloaded optimizer: the outer tensors'
    // update landed in the store
    if (!m->streamed || m->frozen || !m->weights_needed || (bucket != 0 && bucket != m->cfg.L + 1)) return;
    if (bucket == 0) sync_outer(m, m->index_wte, 1);
    if (bucket != 0) sync_outer(m, m->index_norm, 1);
    if (bucket != 0 && m->index_lm != m->index_wte) sync_outer(m, m->index_lm, 1);
}

// A forward's start: the embedding's weights (stale slots dropped when the
// offloaded optimizer updates a streamed base in the store).
static void begin_forward(mt_model *m) {
    for (int k = 0; k < m->nslots && !m->frozen && m->weights_needed; k++) m->slot_layer[k] = -1;
    weights_needed(m, 0);
}

// x[0]: the tokens' embeddings (perturbed rows under MeZO's perturbation).
static void embed_forward(mt_model *m) {
    const mt_model_config *c = &m->cfg;
    int N = m->B * m->T;
    // a deferred update reaches the weights before anything unperturbed reads
    // them, and the embedding table before its rows are gathered
    if (m->pending && m->perturb_scale == 0.0f) mt_model_flush_update(m);
    if (m->pending && !m->frozen) apply_pending(m, m->index_wte);
    mt_op_embedding_forward(m->be, m->x[0], m->tokens, m->wte, N, c->C);
    if (m->perturb_scale != 0.0f && !m->frozen && m->perturb_selected[m->index_wte])
        mt_op_perturb_rows(m->be, m->x[0], m->tokens, N, c->C, m->perturb_scale, m->perturb_seed,
                           m->params[m->index_wte].offset);
    if (c->embed_scale != 0.0f) mt_op_scale(m->be, m->x[0], (size_t)N * c->C, c->embed_scale);  // Gemma
}

// lnf: the final norm of x[L] (its weight perturbed under MeZO).
static void final_norm(mt_model *m) {
    const mt_model_config *c = &m->cfg;
    const void *norm_w = m->frozen ? m->norm_w : perturbed(m, m->index_norm, m->norm_w);
    mt_op_rmsnorm_forward(m->be, m->lnf, m->rstdf, m->x[c->L], norm_w, m->B * m->T, c->C, c->rms_eps, c->gemma);
}

static void body_forward(mt_model *m) {
    const mt_model_config *c = &m->cfg;
    int offload = m->offload && m->training;
    begin_forward(m);
    embed_forward(m);
    if (offload && offloaded(m, 0)) move_x(m, 0, 1);
    for (int l = 0; l < c->L; l++) {
        // x[l+1]'s slot held x[l-1]: its copy out must be done
        if (offload && l >= 1 && offloaded(m, l - 1)) wait_x(m, l - 1);
        weights_needed(m, 1 + l);
        stream_layer(m, l, l + 1);
        layer_forward(m, l, 0);
        write_back_layer(m, l);  // a deferred MeZO update it applied
        if (offload && offloaded(m, l + 1)) move_x(m, l + 1, 1);
    }
    weights_needed(m, 1 + c->L);
    final_norm(m);
}

// The loss of lnf's rows against the targets, lm_head's product and the
// cross-entropy in row chunks (forward only).
static double head_loss(mt_model *m) {
    const mt_model_config *c = &m->cfg;
    int N = m->B * m->T;
    const void *lm_w = lm_weight(m);
    for (int r0 = 0; r0 < N; r0 += m->chunk_rows) {
        int R = N - r0 < m->chunk_rows ? N - r0 : m->chunk_rows;
        mt_op_logits_forward(m->be, m->logits, rows(m, m->lnf, (size_t)r0, (size_t)c->C), lm_w, R, c->C, c->V);
        mt_op_crossentropy(m->be, m->losses + r0, NULL, m->logits, m->targets + r0, R, c->V, 0.0f);
    }
    return mt_op_sum(m->be, m->losses, (size_t)N);
}

void mt_model_forward_pair(mt_model *m, const int32_t *inputs, const int32_t *targets, uint64_t seed, float scale,
                           double *plus, double *minus) {
    const mt_model_config *c = &m->cfg;
    MT_CHECK(m->forward_only && m->perturb_selected, "a perturbed pair needs a forward-only model with perturbation");
    m->training = 0;
    upload_tokens(m, inputs, targets);
    void **xs[2] = {m->x, m->x_pair};
    float signed_scale[2] = {scale, -scale};
    double loss[2];
    begin_forward(m);
    for (int s = 0; s < 2; s++) {
        m->x = xs[s];
        mt_model_set_perturbation(m, seed, signed_scale[s]);
        embed_forward(m);
    }
    // each layer's weights read once (streamed: copied once) for both signs
    for (int l = 0; l < c->L; l++) {
        weights_needed(m, 1 + l);
        stream_layer(m, l, l + 1);
        for (int s = 0; s < 2; s++) {
            m->x = xs[s];
            mt_model_set_perturbation(m, seed, signed_scale[s]);
            mirror_phase(m, s == 0);  // the + pass's kernels also write what the - pass reads
            layer_forward(m, l, 0);
            if (s == 0) write_back_layer(m, l);  // the + pass applied the deferred update
        }
        mirror_phase(m, -1);
    }
    weights_needed(m, 1 + c->L);
    for (int s = 0; s < 2; s++) {
        m->x = xs[s];
        mt_model_set_perturbation(m, seed, signed_scale[s]);
        final_norm(m);
        loss[s] = head_loss(m);
    }
    m->x = xs[0];
    mt_model_set_perturbation(m, 0, 0.0f);
    *plus = loss[0], *minus = loss[1];
}

double mt_model_step(mt_model *m, const int32_t *inputs, const int32_t *targets, float dscale, int backward) {
    const mt_model_config *c = &m->cfg;
    mt_backend *be = m->be;
    int N = m->B * m->T, streamed = backward && m->grad_ready;
    MT_CHECK(!backward || (!m->forward_only && m->perturb_scale == 0.0f),
             "backward on a forward-only or perturbed model");
    m->training = backward;
    upload_tokens(m, inputs, targets);
    body_forward(m);
    if (!backward) {
        m->skipped = 0;
        return head_loss(m);
    }
    if (streamed) {
        mt_op_zero(be, m->grad_outer, m->grad_outer_count * sizeof(float));
        if (m->index_lm != m->index_wte) mt_op_zero(be, m->g_lm, m->params[m->index_lm].count * sizeof(float));
    }
    const void *lm_w = lm_weight(m);
    // lm_head and the loss in row chunks; backward of each chunk right away,
    // so only one chunk of logits ever exists
    for (int r0 = 0; r0 < N; r0 += m->chunk_rows) {
        int R = N - r0 < m->chunk_rows ? N - r0 : m->chunk_rows;
        void *x = rows(m, m->lnf, (size_t)r0, (size_t)c->C);
        mt_op_logits_forward(be, m->logits, x, lm_w, R, c->C, c->V);
        mt_op_crossentropy(be, m->losses + r0, m->dlogits, m->logits, m->targets + r0, R, c->V, dscale);
        mt_op_matmul_backward(be, rows(m, m->dln, (size_t)r0, (size_t)c->C), m->g_lm, NULL, m->dlogits, x, m->lm_w, R,
                              c->C, c->V, 0);
    }
    double loss = mt_op_sum(be, m->losses, (size_t)N);
    // streamed: a non-finite loss skips backward (nothing is handed over), on
    // every rank if any has one
    int skip = streamed && !isfinite(loss);
    if (streamed && m->agree) skip = m->agree(m->agree_ctx, skip);
    m->skipped = skip;
    if (skip) return loss;
    if (streamed && m->index_lm != m->index_wte) m->grad_ready(m->grad_ready_ctx, m->index_lm, m->g_lm);
    mt_op_zero(be, m->dres, (size_t)N * c->C * mt_act_size(be));
    mt_op_rmsnorm_backward(be, m->dres, m->g_norm, m->dln, m->x[c->L], m->norm_w, m->rstdf, N, c->C, c->gemma);
    if (streamed) m->grad_ready(m->grad_ready_ctx, m->index_norm, m->g_norm);
    if (m->grads_done) m->grads_done(m->grads_done_ctx, c->L + 1);
    for (int l = c->L - 1; l >= 0; l--) {
        // fetch x[l-1] into the slot x[l+1] used, while layer l runs
        if (l >= 1 && offloaded(m, l - 1)) move_x(m, l - 1, 0);
        if (offloaded(m, l)) wait_x(m, l);
        if (streamed) mt_op_zero(be, stream_buffer(m, l), m->grad_stream_count * sizeof(float));
        stream_layer(m, l, l - 1);
        layer_backward(m, l);
        // the layer's gradients are complete: each is applied and its place reused
        for (int p = 0; p < P_LAYER_COUNT && streamed; p++)
            if (m->layers[l].index[p] >= 0) m->grad_ready(m->grad_ready_ctx, m->layers[l].index[p], m->layers[l].g[p]);
        if (m->grads_done) m->grads_done(m->grads_done_ctx, 1 + l);
    }
    if (streamed && m->index_lm != m->index_wte)
        mt_op_zero(be, m->g_wte, m->params[m->index_wte].count * sizeof(float));
    if (m->g_wte && c->embed_scale != 0.0f) mt_op_scale(be, m->dres, (size_t)N * c->C, c->embed_scale);
    if (m->g_wte) mt_op_embedding_backward(be, m->g_wte, m->tokens, m->dres, N, c->C);
    if (streamed) m->grad_ready(m->grad_ready_ctx, m->index_wte, m->g_wte);
    if (m->grads_done) m->grads_done(m->grads_done_ctx, 0);
    return loss;
}

void mt_model_logits(mt_model *m, const int32_t *inputs, float *logits) {
    const mt_model_config *c = &m->cfg;
    int N = m->B * m->T;
    m->training = 0;
    upload_tokens(m, inputs, NULL);
    body_forward(m);
    const void *lm_w = lm_weight(m);
    for (int r0 = 0; r0 < N; r0 += m->chunk_rows) {
        int R = N - r0 < m->chunk_rows ? N - r0 : m->chunk_rows;
        mt_op_logits_forward(m->be, m->logits, rows(m, m->lnf, (size_t)r0, (size_t)c->C), lm_w, R, c->C, c->V);
        size_t bytes = (size_t)R * c->V * sizeof(float);
        mt_backend_to_host(m->be, logits + (size_t)r0 * c->V, m->logits, bytes);
    }
}

// Decoding on a GPU replays a step's launches as one CUDA Graph where the
// step's work is the same every time: the weights stay where they are (not
// streamed, no pending update) and the logits are one chunk. The positions
// and tokens are read from device memory, so the graph serves every step.
// MT_CUDA_GRAPHS=0 in the environment turns it off.
static int decode_graph_fits(mt_model *m) {
    const char *env = getenv("MT_CUDA_GRAPHS");
    const char *why = !m->be->gpu                         ? "not on a GPU"
                      : env && strcmp(env, "0") == 0      ? "MT_CUDA_GRAPHS=0 in the environment"
                      : m->streamed || m->weights_needed  ? "the weights are streamed"
                      : m->pending || m->perturb_selected ? "the weights change between steps"
                      : m->B * m->T > m->chunk_rows       ? "the logits take several chunks"
                                                          : NULL;
    if (why) snprintf(m->decode_graph_note, sizeof m->decode_graph_note, "%s", why);
    return why == NULL;
}

// The step's device work after the uploads: the body and lm_head into m->logits.
static void decode_step(mt_model *m) {
    body_forward(m);
    mt_op_logits_forward(m->be, m->logits, m->lnf, lm_weight(m), m->B * m->T, m->cfg.C, m->cfg.V);
}

void mt_model_decode(mt_model *m, const int32_t *tokens, const int32_t *pos, float *logits) {
    MT_CHECK(m->decode_len > 0, "mt_model_decode on a model created without decode_len");
    for (int b = 0; b < m->B; b++)
        MT_CHECK(pos[b] >= 0 && pos[b] < m->decode_len, "position %d of row %d outside the cache's %d", pos[b], b,
                 m->decode_len);
    mt_backend_from_host(m->be, m->pos, pos, (size_t)m->B * sizeof *pos);
    if (m->decode_graph_off || (!m->decode_graph && !decode_graph_fits(m))) {
        m->decode_graph_off = 1;
        mt_model_logits(m, tokens, logits);
        return;
    }
    m->training = 0;
    upload_tokens(m, tokens, NULL);
    if (m->decode_graph) {
        mt_graph_launch(m->be, m->decode_graph);
    } else {
        // the first step op by op (kernels loaded, cuBLAS set up), then recorded for the next ones
        decode_step(m);
        mt_graph_begin(m->be);
        // an NF4 base's weights are dequantized into one buffer during the step, and the skinny products load
        // their first weights before waiting for the kernel before them: no programmatic dependent launch
        if (m->quantized) m->be->pdl = 0;
        decode_step(m);
        m->decode_graph = mt_graph_end(m->be, m->decode_graph_note, sizeof m->decode_graph_note);
        m->decode_graph_off = m->decode_graph == NULL;
    }
    mt_backend_to_host(m->be, logits, m->logits, (size_t)m->B * m->T * m->cfg.V * sizeof(float));
}

const char *mt_model_decode_graph(const mt_model *m) {
    return m->decode_graph ? NULL : m->decode_graph_off ? m->decode_graph_note : "not yet recorded";
}

int mt_model_decode_len(const mt_model *m) { return m->decode_len; }
int mt_model_decode_rows(const mt_model *m) { return m->B; }

size_t mt_model_kv_cache_bytes(int gpu, const mt_model_config *cfg, int B, int decode_len) {
    return 2 * (size_t)cfg->L * B * cfg->KV * decode_len * cfg->D * (gpu ? 2 : 4);
}
