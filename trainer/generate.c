// trainer/generate.c: see generate.h. One position at a time, the layer as
// trainer/model.c computes it on the CPU (the reference ops for the
// products, norms and SwiGLU; RoPE from the same tables), keys and values
// kept per layer.
#define _POSIX_C_SOURCE 200809L
#include "trainer/generate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/tokenizer.h"
#include "kernels/nf4.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"
#include "trainer/model.h"

typedef struct {
    const float *ln1, *q, *qb, *k, *kb, *v, *vb, *o, *ob, *ln2, *gate, *up, *down;
    const float *qn, *kn;        // Qwen3's and Gemma's head norms, or NULL
    const float *anorm, *fnorm;  // Gemma: the attention's and the MLP's output norms
    const float *lora_a[MT_LORA_MODULES], *lora_b[MT_LORA_MODULES];  // NULL: no adapter
} layer_w;

struct mt_generator {
    mt_model_config cfg;
    const float *params;
    const float *wte, *norm, *lm;
    layer_w *layers;
    int max_len, pos;
    float *cos_table, *sin_table;
    float *cos_local, *sin_local;  // Gemma's sliding layers' (NULL for other models: no layer reads them)
    float *kcache, *vcache;        // (L, KV, max_len, D)
    // one position's activations
    float *x, *x2, *ln, *q, *k, *v, *qr, *att, *o, *gate, *up, *h, *down, *scores;
    int lora_r;  // an adapter on the fly: its rank, scale and (r) scratch
    float lora_scale, *lora_u;
};

static const float *param(const mt_param_info *table, int n, const float *params, const char *fmt, int l) {
    char name[160];
    snprintf(name, sizeof name, fmt, l);
    for (int i = 0; i < n; i++)
        if (!strcmp(table[i].name, name)) return params + table[i].offset;
    return NULL;
}

mt_err mt_generator_init(mt_generator **out, const mt_model_config *cfg, const float *params, int max_len) {
    *out = NULL;
    mt_generator *g = calloc(1, sizeof *g);
    MT_CHECK(g != NULL, "generator");
    g->cfg = *cfg, g->params = params, g->max_len = max_len;
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(cfg, &n, &total);
    g->wte = param(table, n, params, "model.embed_tokens.weight", 0);
    g->norm = param(table, n, params, "model.norm.weight", 0);
    g->lm = param(table, n, params, "lm_head.weight", 0);
    if (!g->lm) g->lm = g->wte;  // tied
    g->layers = calloc((size_t)cfg->L, sizeof *g->layers);
    MT_CHECK(g->layers != NULL, "generator layers");
    for (int l = 0; l < cfg->L; l++) {
        layer_w *w = &g->layers[l];
        const char *p = "model.layers.%d.";
        char f[96];
#define W(field, suffix) (snprintf(f, sizeof f, "%s%s", p, suffix), w->field = param(table, n, params, f, l))
        W(ln1, "input_layernorm.weight"), W(q, "self_attn.q_proj.weight"), W(qb, "self_attn.q_proj.bias");
        W(k, "self_attn.k_proj.weight"), W(kb, "self_attn.k_proj.bias"), W(v, "self_attn.v_proj.weight");
        W(vb, "self_attn.v_proj.bias"), W(o, "self_attn.o_proj.weight"), W(ob, "self_attn.o_proj.bias");
        W(gate, "mlp.gate_proj.weight"), W(up, "mlp.up_proj.weight");
        if (cfg->gemma) {
            W(anorm, "post_attention_layernorm.weight"), W(ln2, "pre_feedforward_layernorm.weight");
            W(fnorm, "post_feedforward_layernorm.weight");
        } else {
            W(ln2, "post_attention_layernorm.weight");
        }
        W(down, "mlp.down_proj.weight"), W(qn, "self_attn.q_norm.weight"), W(kn, "self_attn.k_norm.weight");
        if (cfg->fused) W(q, "self_attn.qkv_proj.weight"), W(gate, "mlp.gate_up_proj.weight");
        // Phi-3: k, v and up are row blocks of their fused module's tensor
        const float **linear[MT_LORA_MODULES] = {&w->q, &w->k, &w->v, &w->o, &w->gate, &w->up, &w->down};
        for (int t = 0; t < MT_LORA_MODULES; t++)
            if (mt_lora_fused_part(cfg, t))
                *linear[t] = *linear[mt_lora_fused_owner(cfg, t)] + mt_lora_fused_rows(cfg, t) * (size_t)cfg->C;
#undef W
    }
    free(table);
    int half = cfg->D / 2, C = cfg->C, HD = cfg->H * cfg->D, KVD = cfg->KV * cfg->D, F = cfg->F;
    g->cos_table = malloc((size_t)max_len * half * sizeof(float));
    g->sin_table = malloc((size_t)max_len * half * sizeof(float));
    int sliding = cfg->global_every > 0;  // Gemma: its sliding layers' own tables
    g->cos_local = sliding ? malloc((size_t)max_len * half * sizeof(float)) : NULL;
    g->sin_local = sliding ? malloc((size_t)max_len * half * sizeof(float)) : NULL;
    size_t cache = (size_t)cfg->L * cfg->KV * max_len * cfg->D;
    g->kcache = malloc(cache * sizeof(float));
    g->vcache = malloc(cache * sizeof(float));
    g->x = malloc((size_t)C * 4), g->x2 = malloc((size_t)C * 4), g->ln = malloc((size_t)C * 4);
    g->q = malloc((size_t)HD * 4), g->qr = malloc((size_t)HD * 4), g->att = malloc((size_t)HD * 4);
    g->k = malloc((size_t)KVD * 4), g->v = malloc((size_t)KVD * 4), g->o = malloc((size_t)C * 4);
    g->gate = malloc((size_t)F * 4), g->up = malloc((size_t)F * 4), g->h = malloc((size_t)F * 4);
    g->down = malloc((size_t)C * 4), g->scores = malloc((size_t)max_len * 4);
    if (!g->cos_table || !g->sin_table || (sliding && (!g->cos_local || !g->sin_local)) || !g->kcache || !g->vcache ||
        !g->x || !g->x2 || !g->ln || !g->q || !g->qr || !g->att || !g->k || !g->v || !g->o || !g->gate || !g->up ||
        !g->h || !g->down || !g->scores) {
        mt_generator_free(g);
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for a %d-position key/value cache (%.1f GiB)", max_len,
                         2.0 * cache * 4 / 1073741824.0);
    }
    mt_model_rope_tables(cfg, 0, max_len, g->cos_table, g->sin_table);
    if (sliding) mt_model_rope_tables(cfg, 1, max_len, g->cos_local, g->sin_local);
    *out = g;
    return MT_OK;
}

void mt_generator_free(mt_generator *g) {
    if (!g) return;
    free(g->layers), free(g->cos_table), free(g->sin_table), free(g->cos_local), free(g->sin_local);
    free(g->kcache), free(g->vcache);
    free(g->x), free(g->x2), free(g->ln), free(g->q), free(g->qr), free(g->att), free(g->k), free(g->v);
    free(g->o), free(g->gate), free(g->up), free(g->h), free(g->down), free(g->scores), free(g->lora_u);
    free(g);
}

void mt_generator_set_adapter(mt_generator *g, const mt_lora_config *lora, const float *values) {
    int n;
    size_t total;
    mt_param_info *table = mt_lora_param_table(&g->cfg, lora, &n, &total);
    free(g->lora_u);
    g->lora_u = malloc((size_t)lora->r * sizeof(float));
    MT_CHECK(g->lora_u != NULL, "adapter scratch");
    g->lora_r = lora->r, g->lora_scale = mt_lora_scale(lora);
    for (int i = 0; i < n; i++) {
        int l, module, is_b;
        MT_CHECK(mt_lora_parse_name(table[i].name, &l, &module, &is_b), "adapter name %s", table[i].name);
        const float **slot = is_b ? &g->layers[l].lora_b[module] : &g->layers[l].lora_a[module];
        *slot = values + table[i].offset;
    }
    free(table);
    // Phi-3: the parts of a fused module share its adapter's A and take row blocks of its B
    for (int l = 0; l < g->cfg.L; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) {
            layer_w *w = &g->layers[l];
            int owner = mt_lora_fused_owner(&g->cfg, t);
            if (owner == t || !w->lora_a[owner]) continue;
            w->lora_a[t] = w->lora_a[owner];
            w->lora_b[t] = w->lora_b[owner] + mt_lora_fused_rows(&g->cfg, t) * (size_t)lora->r;
        }
}

mt_err mt_generate_quantize_nf4(const mt_model_config *cfg, float *params) {
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(cfg, &n, &total);
    mt_backend host = {0};  // the CPU reference's arithmetic
    mt_err err = MT_OK;
    // the layers' matrices: the linear modules (q_proj ... down_proj, or Phi-3's fused ones)
    for (int i = 0; i < n && !err; i++) {
        const mt_param_info *w = &table[i];
        if (w->ndim != 2 || !strstr(w->name, ".layers.")) continue;
        void *storage = malloc(mt_nf4_storage_bytes(w->count));
        if (!storage) {
            err = mt_errorf(MT_ERR_NOMEM, "out of host memory quantizing %s to NF4", w->name);
            break;
        }
        mt_nf4 q;
        mt_nf4_bind(&q, storage, w->count);
        err = mt_nf4_quantize(&host, &q, params + w->offset);
        if (!err) mt_nf4_dequantize_ref(params + w->offset, &q);
        free(storage);
    }
    free(table);
    return err;
}

// y += scale * B (A x) where layer l's module t has an adapter.
static void adapt(mt_generator *g, int l, mt_lora_module t, float *y, const float *x, int IN, int OUT) {
    const layer_w *w = &g->layers[l];
    if (!w->lora_a[t]) return;
    mt_matmul_forward_ref(g->lora_u, x, w->lora_a[t], NULL, 1, IN, g->lora_r);
    mt_matmul_forward_add_ref(y, g->lora_u, w->lora_b[t], 1, g->lora_r, OUT, g->lora_scale);
}

void mt_generator_reset(mt_generator *g) { g->pos = 0; }
int mt_generator_position(const mt_generator *g) { return g->pos; }

// One position's attention over the cached keys: each query head over its
// kv head's keys from the window's first to this position.
static void attend(mt_generator *g, int l) {
    const mt_model_config *c = &g->cfg;
    int D = c->D, group = c->H / c->KV, t = g->pos;
    int sliding = c->global_every == 0 || mt_layer_local(c, l);  // Gemma: its sliding layers only
    int first = sliding && c->sliding_window > 0 && c->sliding_window <= t ? t - (int)c->sliding_window + 1 : 0;
    float scale = c->attn_scale != 0.0f ? c->attn_scale : 1.0f / sqrtf((float)D);
    for (int h = 0; h < c->H; h++) {
        int kv = h / group;
        const float *q = g->qr + (size_t)h * D;
        const float *K = g->kcache + (((size_t)l * c->KV + kv) * g->max_len) * D;
        const float *V = g->vcache + (((size_t)l * c->KV + kv) * g->max_len) * D;
        float mx = -INFINITY;
        for (int j = first; j <= t; j++) {
            float s = 0.0f;
            for (int d = 0; d < D; d++) s += q[d] * K[(size_t)j * D + d];
            g->scores[j] = s * scale;
            if (g->scores[j] > mx) mx = g->scores[j];
        }
        double sum = 0.0;
        for (int j = first; j <= t; j++) sum += g->scores[j] = expf(g->scores[j] - mx);
        float *y = g->att + (size_t)h * D;
        for (int d = 0; d < D; d++) y[d] = 0.0f;
        for (int j = first; j <= t; j++) {
            float p = (float)(g->scores[j] / sum);
            for (int d = 0; d < D; d++) y[d] += p * V[(size_t)j * D + d];
        }
    }
}

mt_err mt_generator_step(mt_generator *g, int32_t token, float *logits) {
    const mt_model_config *c = &g->cfg;
    if (g->pos >= g->max_len)
        return mt_errorf(MT_ERR_USAGE, "generation reached %d positions, the cache's length (--max-len)", g->max_len);
    if (token < 0 || token >= c->V) return mt_errorf(MT_ERR_USAGE, "token %d is outside the vocabulary", token);
    int C = c->C, D = c->D, half = D / 2, HD = c->H * D, KVD = c->KV * D, t = g->pos;
    float rstd;
    int gm = c->gemma;
    memcpy(g->x, g->wte + (size_t)token * C, (size_t)C * sizeof(float));
    if (c->embed_scale != 0.0f)
        for (int i = 0; i < C; i++) g->x[i] *= c->embed_scale;
    for (int l = 0; l < c->L; l++) {
        const layer_w *w = &g->layers[l];
        int local = mt_layer_local(c, l);
        const float *cs = (local ? g->cos_local : g->cos_table) + (size_t)t * half;
        const float *sn = (local ? g->sin_local : g->sin_table) + (size_t)t * half;
        mt_rmsnorm_forward_ref(g->ln, &rstd, g->x, w->ln1, 1, C, c->rms_eps, gm);
        mt_matmul_forward_ref(g->q, g->ln, w->q, w->qb, 1, C, HD);
        adapt(g, l, MT_LORA_Q, g->q, g->ln, C, HD);
        mt_matmul_forward_ref(g->k, g->ln, w->k, w->kb, 1, C, KVD);
        adapt(g, l, MT_LORA_K, g->k, g->ln, C, KVD);
        mt_matmul_forward_ref(g->v, g->ln, w->v, w->vb, 1, C, KVD);
        adapt(g, l, MT_LORA_V, g->v, g->ln, C, KVD);
        if (w->qn) {  // Qwen3: each head's query and key normalised (in place, a row at a time)
            for (int h = 0; h < c->H; h++)
                mt_rmsnorm_forward_ref(g->q + h * D, &rstd, g->q + h * D, w->qn, 1, D, c->rms_eps, gm);
            for (int h = 0; h < c->KV; h++)
                mt_rmsnorm_forward_ref(g->k + h * D, &rstd, g->k + h * D, w->kn, 1, D, c->rms_eps, gm);
        }
        // RoPE (rotate-half), queries into qr, keys and values into the cache
        for (int h = 0; h < c->H + c->KV; h++) {
            const float *x = h < c->H ? g->q + (size_t)h * D : g->k + (size_t)(h - c->H) * D;
            float *y =
                h < c->H ? g->qr + (size_t)h * D : g->kcache + (((size_t)l * c->KV + (h - c->H)) * g->max_len + t) * D;
            for (int i = 0; i < half; i++) {
                y[i] = x[i] * cs[i] - x[i + half] * sn[i];
                y[i + half] = x[i + half] * cs[i] + x[i] * sn[i];
            }
        }
        for (int kv = 0; kv < c->KV; kv++)
            memcpy(g->vcache + (((size_t)l * c->KV + kv) * g->max_len + t) * D, g->v + (size_t)kv * D,
                   (size_t)D * sizeof(float));
        attend(g, l);
        mt_matmul_forward_ref(g->o, g->att, w->o, w->ob, 1, HD, C);
        adapt(g, l, MT_LORA_O, g->o, g->att, HD, C);
        if (gm) mt_rmsnorm_forward_ref(g->o, &rstd, g->o, w->anorm, 1, C, c->rms_eps, 1);
        mt_add_ref(g->x2, g->x, g->o, (size_t)C);
        mt_rmsnorm_forward_ref(g->ln, &rstd, g->x2, w->ln2, 1, C, c->rms_eps, gm);
        mt_matmul_forward_ref(g->gate, g->ln, w->gate, NULL, 1, C, c->F);
        adapt(g, l, MT_LORA_GATE, g->gate, g->ln, C, c->F);
        mt_matmul_forward_ref(g->up, g->ln, w->up, NULL, 1, C, c->F);
        adapt(g, l, MT_LORA_UP, g->up, g->ln, C, c->F);
        mt_glu_forward_ref(g->h, g->gate, g->up, (size_t)c->F, gm ? MT_ACT_GELU_TANH : MT_ACT_SILU);
        mt_matmul_forward_ref(g->down, g->h, w->down, NULL, 1, c->F, C);
        adapt(g, l, MT_LORA_DOWN, g->down, g->h, c->F, C);
        if (gm) mt_rmsnorm_forward_ref(g->down, &rstd, g->down, w->fnorm, 1, C, c->rms_eps, 1);
        mt_add_ref(g->x, g->x2, g->down, (size_t)C);
    }
    g->pos++;
    if (!logits) return MT_OK;
    mt_rmsnorm_forward_ref(g->ln, &rstd, g->x, g->norm, 1, C, c->rms_eps, gm);
    mt_matmul_forward_ref(logits, g->ln, g->lm, NULL, 1, C, c->V);
    return MT_OK;
}

// ------------------------------------------------------------ sampling

typedef struct {
    float logit;
    int32_t id;
} cand;

static int by_logit_desc(const void *a, const void *b) {
    float x = ((const cand *)a)->logit, y = ((const cand *)b)->logit;
    if (x != y) return x < y ? 1 : -1;
    return ((const cand *)a)->id - ((const cand *)b)->id;
}

// A logit over the temperature; NaN (a broken model's) as -inf: never drawn,
// and the candidates' order stays total.
static float scaled(float logit, float temperature) {
    float x = logit / temperature;
    return isnan(x) ? -INFINITY : x;
}

static int by_id(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static void c_swap(cand *c, int i, int j) {
    cand t = c[i];
    c[i] = c[j], c[j] = t;
}

// c[0..k) as a heap with its last candidate (by by_logit_desc) at the root:
// restores that below node i.
static void sift_worst(cand *c, int k, int i) {
    for (;;) {
        int w = i, l = 2 * i + 1, r = l + 1;
        if (l < k && by_logit_desc(&c[l], &c[w]) > 0) w = l;
        if (r < k && by_logit_desc(&c[r], &c[w]) > 0) w = r;
        if (w == i) return;
        c_swap(c, i, w);
        i = w;
    }
}

// Moves the k candidates that by_logit_desc puts first into c[0..k), in no
// order, the rest into c[k..n) (the order is total: ties go by id). A few
// among many: one pass against a heap of the k best so far (most
// candidates cost one comparison); else quickselect.
static void select_head(cand *c, int n, int k) {
    if (k < 1 || k >= n) return;
    if (k <= 1024 && n >= 16 * k) {
        for (int i = k / 2 - 1; i >= 0; i--) sift_worst(c, k, i);
        for (int i = k; i < n; i++)
            if (by_logit_desc(&c[i], &c[0]) < 0) {
                c_swap(c, 0, i);
                sift_worst(c, k, 0);
            }
        return;
    }
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        cand pivot = c[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (by_logit_desc(&c[i], &pivot) < 0) i++;
            while (by_logit_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) c_swap(c, i++, j--);
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            return;
    }
}

// c[0..sorted) holds a whole sort's first candidates in its order; extends
// that to past index i (four times as far, 64 at least; all of it once that
// is a quarter of n) by selecting the next ones among the rest and sorting
// them alone. Returns the new extent.
static int sort_more(cand *c, int n, int sorted, int i) {
    int want = 4 * sorted > 64 ? 4 * sorted : 64;
    if (want < i + 1) want = i + 1;
    if (want > n / 4) want = n;
    if (want < n) select_head(c + sorted, n - sorted, want - sorted);
    qsort(c + sorted, (size_t)(want - sorted), sizeof *c, by_logit_desc);
    return want;
}

// The last index a walk adding weights of at most 1 reaches before its sum
// passes `sum`: the walk sorts that far at once (capped at keep - 1).
static int reach_at_least(double sum, int keep) { return sum >= keep - 1 ? keep - 1 : sum > 1.0 ? (int)sum - 1 : 0; }

int32_t mt_sample(float *logits, int V, const mt_sampling *s, const uint32_t *history, size_t n_history,
                  uint64_t draw) {
    MT_CHECK(V > 0, "sampling over an empty vocabulary");
    if (s->repetition_penalty != 1.0f && n_history) {
        // once per distinct id, as transformers gathers the scores of the ids
        // seen (a bit per id: the history is read once, not once per id)
        unsigned char *seen = calloc(((size_t)V + 7) / 8, 1);
        MT_CHECK(seen != NULL, "repetition penalty");
        for (size_t i = 0; i < n_history; i++) {
            uint32_t id = history[i];
            if (id >= (uint32_t)V || seen[id / 8] & (1u << (id % 8))) continue;
            seen[id / 8] |= (unsigned char)(1u << (id % 8));
            float *x = &logits[id];
            *x = *x > 0 ? *x / s->repetition_penalty : *x * s->repetition_penalty;
        }
        free(seen);
    }
    int32_t best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;
    if (s->temperature <= 0.0f) return best;
    cand *c = malloc((size_t)V * sizeof *c);
    MT_CHECK(c != NULL, "sampling");
    for (int v = 0; v < V; v++) c[v] = (cand){scaled(logits[v], s->temperature), v};
    int n = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    // top-k: the head alone, in no order (the same k as a whole sort's first)
    if (n < V) select_head(c, V, n);
    // the top candidate first; the normaliser over the head relative to it,
    // summed in id order (whatever order the head is in)
    for (int i = 1; i < n; i++)
        if (by_logit_desc(&c[i], &c[0]) < 0) c_swap(c, 0, i);
    double top = c[0].logit, z = 0.0;
    if (n == V) {
        for (int v = 0; v < V; v++) z += exp((double)scaled(logits[v], s->temperature) - top);
    } else {
        int32_t *ids = malloc((size_t)n * sizeof *ids);
        MT_CHECK(ids != NULL, "sampling");
        for (int i = 0; i < n; i++) ids[i] = c[i].id;
        qsort(ids, (size_t)n, sizeof *ids, by_id);
        for (int i = 0; i < n; i++) z += exp((double)scaled(logits[ids[i]], s->temperature) - top);
        free(ids);
    }
    // the head is sorted only as far as the walks below reach (a flat
    // distribution may reach all of it; a peaked one stops after a few)
    int sorted = 1;
    // min-p: drop what is below min_p of the top probability; top-p: the
    // smallest head whose mass reaches top_p (the top token always stays)
    int keep = n;
    if (s->min_p > 0.0f)
        for (int i = 1; i < keep; i++) {
            if (i >= sorted) sorted = sort_more(c, n, sorted, i);
            if (exp((double)c[i].logit - top) < s->min_p) {
                keep = i;
                break;
            }
        }
    double total = z;  // nothing cut: the whole head's mass
    if (s->top_p < 1.0f) {
        // no weight exceeds the top's 1: the walk reaches top_p * z
        // candidates at least, sorted in one go where that is most of them
        int reach = reach_at_least(s->top_p * z, keep);
        double mass = 0.0;
        for (int i = 0; i < keep; i++) {
            if (i >= sorted) sorted = sort_more(c, n, sorted, i > reach ? i : reach);
            mass += exp((double)c[i].logit - top) / z;
            if (mass >= s->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (keep < n) {
        total = 0.0;
        for (int i = 0; i < keep; i++) total += exp((double)c[i].logit - top);
    }
    double u = (double)(mt_rng_bits(s->seed, draw) >> 11) * (1.0 / 9007199254740992.0) * total, acc = 0.0;
    // past the walk (rounding: the sorted sum may end just below a total
    // summed in id order), the last token of any weight it passed
    int32_t pick = c[0].id, reach = reach_at_least(u, keep);
    for (int i = 0; i < keep; i++) {
        if (i >= sorted) sorted = sort_more(c, n, sorted, i > reach ? i : reach);
        double p = exp((double)c[i].logit - top);
        if (p > 0.0) pick = c[i].id;
        acc += p;
        if (u < acc) break;
    }
    free(c);
    return pick;
}

// ------------------------------------------------------------ text

void mt_generate_prompt(const mt_tokenizer *tok, const char *text, mt_ids *ids) {
    int bos = tok ? mt_tokenizer_bos(tok) : MT_TOKEN_BOS;
    if (bos >= 0) mt_ids_push(ids, (uint32_t)bos);
    if (tok)
        mt_tokenizer_encode(tok, text, strlen(text), ids);
    else
        mt_bytes_encode(text, strlen(text), ids);
}

// One sequence being generated, driven by the logits of its last token:
// the ids so far, the text of the new ones and what of it was streamed. The
// CPU generator runs one; batched decoding runs one a row.
typedef struct {
    const mt_tokenizer *tok;
    const mt_generate_options *o;
    FILE *stream;
    mt_ids hist;
    size_t start, fed, shown, hold, len;  // prompt length, ids fed so far, text streamed, held back, text length
    char *text;
    int done;
} gen_seq;

static void seq_begin(gen_seq *s, const mt_tokenizer *tok, const mt_ids *prompt, const mt_generate_options *o,
                      FILE *stream) {
    *s = (gen_seq){.tok = tok, .o = o, .stream = stream};
    for (size_t i = 0; i < prompt->n; i++) mt_ids_push(&s->hist, prompt->ids[i]);
    s->start = prompt->n;
    for (int k = 0; k < o->n_stops; k++)
        if (strlen(o->stops[k]) > s->hold) s->hold = strlen(o->stops[k]);
    s->done = prompt->n == 0;
}

// The logits after every id so far was fed: the next token, unless the
// sequence ends (an end id, a stop text, max_new tokens).
static void seq_take(gen_seq *s, float *logits, int V) {
    const mt_generate_options *o = s->o;
    size_t n = s->hist.n - s->start;
    int32_t next = mt_sample(logits, V, &o->sampling, s->hist.ids, s->hist.n, (uint64_t)n);
    if (next == o->eos || next == o->eot) {
        s->done = 1;
        return;
    }
    mt_ids_push(&s->hist, (uint32_t)next);
    free(s->text);
    const uint32_t *ids = s->hist.ids + s->start;
    s->text = s->tok ? mt_tokenizer_decode(s->tok, ids, n + 1, 1, &s->len) : mt_bytes_decode(ids, n + 1, &s->len);
    // stream what is complete (a trailing U+FFFD may be half a character still)
    size_t ready = s->len;
    if (ready >= 3 && !memcmp(s->text + ready - 3, "\xef\xbf\xbd", 3)) ready -= 3;
    ready = ready > s->hold ? ready - s->hold : 0;  // what may still become a stop string waits
    if (s->stream && ready > s->shown) {
        fwrite(s->text + s->shown, 1, ready - s->shown, s->stream);
        fflush(s->stream);
        s->shown = ready;
    }
    for (int k = 0; k < o->n_stops && !s->done; k++) {
        size_t sl = strlen(o->stops[k]);
        if (s->len >= sl && !memcmp(s->text + s->len - sl, o->stops[k], sl))
            s->done = 1, s->len -= sl, s->text[s->len] = '\0';
    }
    // the last token's logits would serve nothing: it is not fed
    if (n + 1 >= (size_t)o->max_new) s->done = 1;
}

// The text (malloc'd; the rest streamed); the sequence's ids are freed.
static char *seq_end(gen_seq *s) {
    if (s->stream && s->text && s->len > s->shown) fwrite(s->text + s->shown, 1, s->len - s->shown, s->stream);
    if (s->stream) fputc('\n', s->stream);
    mt_ids_free(&s->hist);
    char *text = s->text ? s->text : calloc(1, 1);
    s->text = NULL;
    return text;
}

mt_err mt_generate_text(mt_generator *g, const mt_tokenizer *tok, const mt_ids *prompt, const mt_generate_options *o,
                        FILE *stream, char **text_out) {
    int V = g->cfg.V;
    mt_generator_reset(g);
    float *logits = malloc((size_t)V * sizeof(float));
    MT_CHECK(logits != NULL, "logits");
    gen_seq s;
    seq_begin(&s, tok, prompt, o, stream);
    mt_err err = MT_OK;
    while (!s.done && !err) {
        for (; s.fed < s.hist.n && !err; s.fed++)
            err = mt_generator_step(g, (int32_t)s.hist.ids[s.fed], s.fed + 1 == s.hist.n ? logits : NULL);
        if (!err) seq_take(&s, logits, V);
    }
    free(logits);
    *text_out = seq_end(&s);
    return err;
}

mt_err mt_generate_batch(mt_model *m, const mt_tokenizer *tok, const mt_ids *prompts, int n,
                         const mt_generate_options *o, FILE *stream, mt_generated_fn ready, void *ctx,
                         mt_generate_stats *stats) {
    const mt_model_config *c = mt_model_get_config(m);
    mt_generate_stats st = {0};
    int cache = mt_model_decode_len(m), rows = mt_model_decode_rows(m);
    gen_seq *seqs = calloc((size_t)rows, sizeof *seqs);
    int *item = malloc((size_t)rows * sizeof *item);  // the prompt each row is on, -1: none
    int32_t *tokens = malloc((size_t)rows * sizeof *tokens), *pos = malloc((size_t)rows * sizeof *pos);
    float *logits = malloc((size_t)rows * c->V * sizeof(float));
    char **texts = calloc((size_t)(n ? n : 1), sizeof *texts);
    MT_CHECK(seqs && item && pos && tokens && logits && texts, "generation batch");
    mt_err err = MT_OK;
    int next_item = 0, next_ready = 0;
    for (int r = 0; r < rows; r++) item[r] = -1;
    while (!err && next_ready < n) {
        // rows whose sequence ended take the next prompt
        for (int r = 0; r < rows; r++) {
            if (item[r] >= 0 || next_item >= n) continue;
            item[r] = next_item++;
            seq_begin(&seqs[r], tok, &prompts[item[r]], o, n == 1 ? stream : NULL);
        }
        int any = 0;  // a row still feeding its sequence
        for (int r = 0; r < rows; r++) {
            gen_seq *s = &seqs[r];
            int live = item[r] >= 0 && !s->done;
            any |= live;
            if (live && s->fed >= (size_t)cache)
                err = mt_errorf(MT_ERR_USAGE, "prompt %d: generation reached %d positions, the cache's length",
                                item[r] + 1, cache);
            tokens[r] = live ? (int32_t)s->hist.ids[s->fed] : 0, pos[r] = live ? (int)s->fed : 0;
        }
        if (any && !err) {
            double t0 = mt_now();
            mt_model_decode(m, tokens, pos, logits);
            st.step_seconds += mt_now() - t0;
            st.steps++;
        }
        // the rows' next tokens: independent, on the host's cores (one row
        // streams to the terminal only when it is the only prompt)
        if (!err) {
#pragma omp parallel for schedule(dynamic) if (rows > 1)
            for (int r = 0; r < rows; r++) {
                gen_seq *s = &seqs[r];
                if (item[r] >= 0 && !s->done && ++s->fed == s->hist.n) seq_take(s, logits + (size_t)r * c->V, c->V);
            }
        }
        for (int r = 0; r < rows && !err; r++) {
            gen_seq *s = &seqs[r];
            if (item[r] < 0 || !s->done) continue;
            st.new_tokens += (long)(s->hist.n - s->start);
            texts[item[r]] = seq_end(s);
            item[r] = -1;
        }
        // finished texts in the prompts' order
        for (; !err && next_ready < n && texts[next_ready]; next_ready++) {
            if (ready) ready(ctx, next_ready, texts[next_ready]);
            free(texts[next_ready]);
            texts[next_ready] = NULL;
        }
    }
    for (int r = 0; r < rows; r++)
        if (item[r] >= 0) free(seq_end(&seqs[r]));
    for (int i = next_ready; i < n; i++) free(texts[i]);
    free(seqs), free(item), free(pos), free(tokens), free(logits), free(texts);
    if (stats) *stats = st;
    return err;
}
