// optim/galore.c: GaLore's projected Adam and the projector refresh (galore.h).
//
// Shapes: a row-major gradient G (m, n) read column-major is G^T with leading
// dimension n (linalg.h). With m <= n ("left") GaLore works on A = G (a = m,
// b = n), else on A = G^T (a = n, b = m): a is the side P spans. The
// projected gradient is X = P^T A (r, b), its Adam direction D goes back as
// P D, which is A's shape; for the right side that is the update's transpose,
// so both write the update straight into G's buffer as G's layout wants.
#include "optim/galore.h"

#include <math.h>
#include <stdlib.h>

#include "kernels/linalg.h"
#include "kernels/mem.h"
#include "kernels/ops.h"
#include "kernels/rng.h"

#define OVERSAMPLE 8   // extra columns of the randomized range finder
#define POWER_ITERS 2  // subspace iterations after the first product

typedef struct {
    const char *name;
    size_t count;
    int decay, projected, external;
    int left, a, b, r;  // projected only
    int refreshed_at;   // the step its projector was made for
    float *P;           // (a, r) column-major
    mt_adam_state st;   // over state_n values: r * b projected, else count
    size_t state_n;
    void *block;  // moments and codes, one allocation
} galore_param;

struct mt_galore {
    mt_backend *be;
    mt_galore_config cfg;
    int n;
    galore_param *p;
    int steps, refreshing;
    float lr, bc1, bc2;
    // each updated parameter's gradient sum of squares, on the backend (the
    // GPU's updates read theirs there: no host wait a parameter), summed on
    // the host at the step's end in the order the updates came
    double *sumsq, *sumsq_host;
    int *order, n_order;
    float *work;  // X, then the refresh's Omega, Y, Z, S, eigenvalues (sized at init)
    double refresh_seconds;
    int refresh_count;
    size_t state_bytes;
    // checkpoint tensors and where each lives on the backend
    mt_state_tensor *tensors;
    void **tensor_src;
    int n_tensors;
    void *host_block;
};

static int subspace_width(const galore_param *p) { return p->r + OVERSAMPLE < p->a ? p->r + OVERSAMPLE : p->a; }

static size_t refresh_floats(const galore_param *p, mt_galore_refresh how) {
    size_t a = (size_t)p->a, b = (size_t)p->b, k = (size_t)subspace_width(p);
    if (how == MT_GALORE_SVD) return a * a + a;
    return b * k + a * k + b * k + k * k + k;
}

void mt_galore_param_bytes(const mt_galore_config *cfg, int64_t rows, int64_t cols, int project, size_t *state,
                           size_t *work_floats) {
    galore_param p = {0};
    p.count = (size_t)rows * (size_t)(cols ? cols : 1);
    *work_floats = 0;
    if (!project || cols <= 0) {
        *state = mt_adam_state_bytes(p.count, cfg->int8);
        return;
    }
    // as mt_galore_init shapes a projected matrix
    int left = rows <= cols;
    p.a = (int)(left ? rows : cols), p.b = (int)(left ? cols : rows);
    p.r = cfg->rank < p.a ? cfg->rank : p.a;
    size_t n = (size_t)p.r * p.b, refresh = refresh_floats(&p, cfg->refresh);
    *state = mt_adam_state_bytes(n, cfg->int8) + (size_t)p.a * p.r * sizeof(float);
    *work_floats = n > refresh ? n : refresh;
}

static mt_err alloc_state(mt_galore *g, galore_param *p) {
    mt_mem_place place = g->be->gpu ? MT_DEVICE : MT_HOST;
    size_t n = p->state_n, blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
    size_t bytes = mt_adam_state_bytes(n, g->cfg.int8);
    mt_err err = mt_alloc(&p->block, bytes, MT_MEM_OPTIMIZER, place);
    if (err) return err;
    g->state_bytes += bytes;
    if (g->cfg.int8) {
        // absmax first: float alignment for them, the codes after
        p->st.m_absmax = p->block;
        p->st.v_absmax = p->st.m_absmax + blocks;
        p->st.mq = (uint8_t *)(p->st.v_absmax + blocks);
        p->st.vq = p->st.mq + n;
    } else {
        p->st.m = p->block;
        p->st.v = p->st.m + n;
    }
    if (p->projected) {
        size_t pb = (size_t)p->a * p->r * sizeof(float);
        err = mt_alloc((void **)&p->P, pb, MT_MEM_OPTIMIZER, place);
        g->state_bytes += pb;
    }
    return err;
}

mt_err mt_galore_init(mt_galore **out, mt_backend *be, const mt_galore_config *cfg, const mt_galore_param *params,
                      int n) {
    *out = NULL;
    MT_CHECK(cfg->rank >= 1 && cfg->update_gap >= 1, "galore: rank %d, update_gap %d", cfg->rank, cfg->update_gap);
    mt_galore *g = calloc(1, sizeof *g);
    MT_CHECK(g != NULL, "galore");
    g->be = be, g->cfg = *cfg, g->n = n;
    g->p = calloc((size_t)(n ? n : 1), sizeof *g->p);
    MT_CHECK(g->p != NULL, "galore parameters");
    size_t work = 0;
    mt_err err = MT_OK;
    for (int i = 0; i < n && !err; i++) {
        const mt_galore_param *q = &params[i];
        galore_param *p = &g->p[i];
        p->name = q->name;
        p->count = (size_t)q->rows * (size_t)(q->cols ? q->cols : 1);
        p->decay = q->decay;
        p->projected = q->project && q->cols > 0;
        p->external = (q->external && !p->projected) || q->elsewhere;
        p->refreshed_at = -1;
        p->state_n = p->count;
        if (p->projected && !p->external) {
            int64_t m = q->rows, nn = q->cols;
            p->left = m <= nn;
            p->a = (int)(p->left ? m : nn), p->b = (int)(p->left ? nn : m);
            p->r = cfg->rank < p->a ? cfg->rank : p->a;
            p->state_n = (size_t)p->r * p->b;
            size_t need = p->state_n > refresh_floats(p, cfg->refresh) ? p->state_n : refresh_floats(p, cfg->refresh);
            if (need > work) work = need;  // X, or the refresh's
        }
        if (!p->external) err = alloc_state(g, p);
    }
    if (!err && work)
        err = mt_alloc((void **)&g->work, work * sizeof(float), MT_MEM_WORKSPACE, be->gpu ? MT_DEVICE : MT_HOST);
    if (!err && n)
        err = mt_alloc((void **)&g->sumsq, (size_t)n * sizeof(double), MT_MEM_OPTIMIZER, be->gpu ? MT_DEVICE : MT_HOST);
    g->sumsq_host = malloc((size_t)(n ? n : 1) * sizeof(double));
    g->order = malloc((size_t)(n ? n : 1) * sizeof(int));
    MT_CHECK(g->sumsq_host && g->order, "galore norms");
    if (err) {
        mt_galore_free(g);
        return err;
    }
    *out = g;
    return MT_OK;
}

void mt_galore_free(mt_galore *g) {
    if (!g) return;
    for (int i = 0; i < g->n; i++) {
        mt_free(&g->p[i].block);
        mt_free((void **)&g->p[i].P);
    }
    mt_free((void **)&g->work);
    mt_free((void **)&g->sumsq);
    free(g->sumsq_host);
    free(g->order);
    free(g->p);
    free(g->tensors);
    free(g->tensor_src);
    free(g->host_block);
    free(g);
}

void mt_galore_begin_step(mt_galore *g, float lr) {
    g->steps++;
    g->lr = lr;
    g->bc1 = 1.0f - powf(g->cfg.beta1, (float)g->steps);
    g->bc2 = 1.0f - powf(g->cfg.beta2, (float)g->steps);
    g->refreshing = (g->steps - 1) % g->cfg.update_gap == 0;
    g->n_order = 0;
    g->refresh_seconds = 0.0;
    g->refresh_count = 0;
}

// The random test matrices and the rounding bits of (step, parameter).
static uint64_t stream(const mt_galore *g, uint64_t salt, int i) {
    return mt_rng_bits(g->cfg.seed ^ salt, (uint64_t)g->steps * (uint64_t)g->n + (uint64_t)i);
}

// P := the top-r left singular vectors of A (a, b), from G's buffer.
static void refresh(mt_galore *g, galore_param *p, int i, const float *G, int ldg) {
    mt_backend *be = g->be;
    int a = p->a, b = p->b, r = p->r, ta = p->left;  // op(G_cm) = A when ta
    double t0 = mt_now();
    if (g->cfg.refresh == MT_GALORE_SVD) {
        // eigenvectors of A A^T (a, a): A's left singular vectors, exactly
        float *S = g->work, *w = S + (size_t)a * a;
        mt_la_gemm(be, ta, !ta, a, a, b, 1.0f, G, ldg, G, ldg, 0.0f, S, a);
        mt_la_symmetric_eigen(be, S, w, a);
        mt_la_copy(be, p->P, S + (size_t)(a - r) * a, (size_t)a * r);
    } else {
        // randomized range finder with subspace iteration (Halko, Martinsson
        // and Tropp, 2011), then the Rayleigh-Ritz rotation to A's singular
        // vectors within the subspace found
        int k = subspace_width(p);
        float *omega = g->work, *Y = omega + (size_t)b * k, *Z = Y + (size_t)a * k, *S = Z + (size_t)b * k,
              *w = S + (size_t)k * k;
        mt_op_gauss(be, omega, (size_t)b * k, stream(g, 0x6a09e667f3bcc908ull, i));
        mt_la_gemm(be, ta, 0, a, k, b, 1.0f, G, ldg, omega, b, 0.0f, Y, a);  // Y = A Omega
        mt_la_orthonormalize(be, Y, a, k);
        for (int it = 0; it < POWER_ITERS; it++) {
            mt_la_gemm(be, !ta, 0, b, k, a, 1.0f, G, ldg, Y, a, 0.0f, Z, b);  // Z = A^T Y
            mt_la_orthonormalize(be, Z, b, k);
            mt_la_gemm(be, ta, 0, a, k, b, 1.0f, G, ldg, Z, b, 0.0f, Y, a);  // Y = A Z
            mt_la_orthonormalize(be, Y, a, k);
        }
        mt_la_gemm(be, !ta, 0, b, k, a, 1.0f, G, ldg, Y, a, 0.0f, Z, b);  // Z = A^T Y
        mt_la_gemm(be, 1, 0, k, k, b, 1.0f, Z, b, Z, b, 0.0f, S, k);      // S = Y^T A A^T Y
        mt_la_symmetric_eigen(be, S, w, k);
        mt_la_gemm(be, 0, 0, a, r, k, 1.0f, Y, a, S + (size_t)(k - r) * k, k, 0.0f, p->P, a);  // the top r
    }
    if (be->gpu) mt_device_synchronize();
    g->refresh_seconds += mt_now() - t0;
    g->refresh_count++;
    p->refreshed_at = g->steps;
}

void mt_galore_update(mt_galore *g, int i, float *grad, void *weights) {
    MT_CHECK(i >= 0 && i < g->n, "galore: parameter %d of %d", i, g->n);
    galore_param *p = &g->p[i];
    MT_CHECK(!p->external, "galore: %s is updated elsewhere", p->name);
    mt_backend *be = g->be;
    // A non-finite gradient leaves this parameter as it was (the others go
    // on): its sum of squares gates its updates on the backend. A refresh
    // waits for the device anyway, and must not see such a gradient.
    double *ss = &g->sumsq[i];
    MT_CHECK(g->n_order < g->n, "galore: more updates than parameters in a step");
    g->order[g->n_order++] = i;
    mt_op_sumsq_to(be, grad, p->count, ss);
    int refresh_now = p->projected && g->refreshing && p->refreshed_at != g->steps;
    if (refresh_now) {
        double host = 0.0;
        mt_backend_to_host(be, &host, ss, sizeof host);
        if (!isfinite(host)) return;
    }
    const mt_galore_config *c = &g->cfg;
    float decay = p->decay ? c->weight_decay : 0.0f;
    uint64_t round_seed = stream(g, 0xbb67ae8584caa73bull, i);
    if (!p->projected) {
        mt_op_adam_direction(be, grad, grad, &p->st, p->count, c->beta1, c->beta2, c->eps, g->bc1, g->bc2, ss);
        mt_op_apply_update(be, weights, grad, p->count, g->lr, 1.0f, decay, round_seed, ss);
        return;
    }
    int a = p->a, b = p->b, r = p->r, ta = p->left, ldg = p->left ? b : a;  // G_cm is (n, m), ld n
    if (refresh_now) refresh(g, p, i, grad, ldg);
    float *X = g->work;
    mt_la_gemm(be, 1, ta, r, b, a, 1.0f, p->P, a, grad, ldg, 0.0f, X, r);  // X = P^T A
    mt_op_adam_direction(be, X, X, &p->st, p->state_n, c->beta1, c->beta2, c->eps, g->bc1, g->bc2, ss);
    // P D back in G's layout: left (G = A) as D^T P^T, right (G = A^T) as P D
    if (p->left)
        mt_la_gemm(be, 1, 1, b, a, r, 1.0f, X, r, p->P, a, 0.0f, grad, ldg);
    else
        mt_la_gemm(be, 0, 0, a, b, r, 1.0f, p->P, a, X, r, 0.0f, grad, ldg);
    mt_op_apply_update(be, weights, grad, p->count, g->lr, c->scale, decay, round_seed, ss);
}

void mt_galore_end_step(mt_galore *g, mt_step_info *info) {
    // one read of the step's sums (which waits for its updates), added in the order they came
    if (g->n) mt_backend_to_host(g->be, g->sumsq_host, g->sumsq, (size_t)g->n * sizeof(double));
    double sumsq = 0.0;
    for (int k = 0; k < g->n_order; k++) sumsq += g->sumsq_host[g->order[k]];
    // (sums of squares are never negative: a NaN or an infinity in any of them makes the total not finite)
    info->grad_norm = sqrt(sumsq);
    info->finite = isfinite(info->grad_norm);
}

void mt_galore_cancel_step(mt_galore *g) {
    g->steps--;
    g->refreshing = 0;
}

int mt_galore_refreshing(const mt_galore *g) { return g->refreshing; }

double mt_galore_last_refresh_seconds(const mt_galore *g, int *matrices) {
    if (matrices) *matrices = g->refresh_count;
    return g->refresh_seconds;
}

int mt_galore_steps_taken(const mt_galore *g) { return g->steps; }
size_t mt_galore_state_bytes(const mt_galore *g) { return g->state_bytes; }

int mt_galore_shape(const mt_galore *g, int i, int *a, int *b, int *r, int *left) {
    const galore_param *p = &g->p[i];
    if (!p->projected) return 0;
    *a = p->a, *b = p->b, *r = p->r, *left = p->left;
    return 1;
}

void mt_galore_set_projector(mt_galore *g, int i, const float *host) {
    galore_param *p = &g->p[i];
    MT_CHECK(p->projected, "galore: %s has no projector", p->name);
    mt_backend_from_host(g->be, p->P, host, (size_t)p->a * p->r * sizeof(float));
    p->refreshed_at = g->steps + 1;  // the step about to begin needs no refresh
}

// ------------------------------------------------------------ checkpoints

static void add_tensor(mt_galore *g, const galore_param *p, const char *name, int is_u8, size_t count, void *src,
                       size_t *host_bytes) {
    if (g->tensors) {
        mt_state_tensor *t = &g->tensors[g->n_tensors];
        *t = (mt_state_tensor){p->name, name, is_u8, count, (char *)g->host_block + *host_bytes, NULL};
        g->tensor_src[g->n_tensors] = src;
    }
    g->n_tensors++;
    *host_bytes += (count * (is_u8 ? 1 : sizeof(float)) + 15) & ~(size_t)15;
}

static size_t list_tensors(mt_galore *g) {
    size_t bytes = 0;
    g->n_tensors = 0;
    for (int i = 0; i < g->n; i++) {
        galore_param *p = &g->p[i];
        size_t n = p->state_n, blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
        if (p->external) continue;
        if (p->projected) add_tensor(g, p, "projector", 0, (size_t)p->a * p->r, p->P, &bytes);
        if (g->cfg.int8) {
            add_tensor(g, p, "exp_avg_q8", 1, n, p->st.mq, &bytes);
            add_tensor(g, p, "exp_avg_absmax", 0, blocks, p->st.m_absmax, &bytes);
            add_tensor(g, p, "exp_avg_sq_q8", 1, n, p->st.vq, &bytes);
            add_tensor(g, p, "exp_avg_sq_absmax", 0, blocks, p->st.v_absmax, &bytes);
        } else {
            add_tensor(g, p, "exp_avg", 0, n, p->st.m, &bytes);
            add_tensor(g, p, "exp_avg_sq", 0, n, p->st.v, &bytes);
        }
    }
    return bytes;
}

int mt_galore_state(mt_galore *g, mt_state_tensor **tensors) {
    if (!g->tensors) {
        size_t bytes = list_tensors(g);
        g->tensors = calloc((size_t)g->n_tensors + 1, sizeof *g->tensors);
        g->tensor_src = calloc((size_t)g->n_tensors + 1, sizeof *g->tensor_src);
        g->host_block = malloc(bytes ? bytes : 1);
        MT_CHECK(g->tensors && g->tensor_src && g->host_block, "out of host memory for GaLore's state (%zu bytes)",
                 bytes);
        list_tensors(g);
    }
    *tensors = g->tensors;
    return g->n_tensors;
}

static void move_tensors(mt_galore *g, int to_host) {
    mt_state_tensor *t;
    int n = mt_galore_state(g, &t);
    for (int k = 0; k < n; k++) {
        size_t bytes = t[k].count * (t[k].is_u8 ? 1 : sizeof(float));
        if (to_host)
            mt_backend_to_host(g->be, t[k].data, g->tensor_src[k], bytes);
        else
            mt_backend_from_host(g->be, g->tensor_src[k], t[k].data, bytes);
    }
}

void mt_galore_state_download(mt_galore *g) { move_tensors(g, 1); }

void mt_galore_state_upload(mt_galore *g, int steps) {
    move_tensors(g, 0);
    g->steps = steps;
    for (int i = 0; i < g->n; i++) g->p[i].refreshed_at = steps;
}
