// kernels/ops_ref.c: CPU reference ops (see ops_ref.h for the semantics).
#include "kernels/ops_ref.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/dtype.h"
#include "kernels/qmap.h"
#include "kernels/rng.h"

void mt_embedding_forward_ref(float *out, const int32_t *tokens, const float *wte, int N, int C) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, (size_t)C * sizeof(float));
}

void mt_embedding_backward_ref(float *dwte, const int32_t *tokens, const float *dout, int N, int C) {
    // serial over rows: two rows may name the same token
    for (int n = 0; n < N; n++) {
        float *row = dwte + (size_t)tokens[n] * C;
        const float *g = dout + (size_t)n * C;
        for (int c = 0; c < C; c++) row[c] += g[c];
    }
}

void mt_rmsnorm_forward_ref(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps,
                            int plus_one) {
    float one = plus_one ? 1.0f : 0.0f;
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += (double)x[c] * x[c];
        float r = (float)(1.0 / sqrt(ss / C + eps));
        rstd[n] = r;
        float *y = out + (size_t)n * C;
        for (int c = 0; c < C; c++) y[c] = x[c] * r * (one + weight[c]);
    }
}

void mt_rmsnorm_backward_ref(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                             const float *rstd, int N, int C, int plus_one) {
    // dx_j = r*w_j*g_j - r^3/C * x_j * sum_i g_i w_i x_i (w: the scale, 1 + weight with plus_one)
    float one = plus_one ? 1.0f : 0.0f;
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
        float r = rstd[n];
        double dot = 0.0;
        for (int c = 0; c < C; c++) dot += (double)g[c] * (one + weight[c]) * x[c];
        float k = (float)(dot * r * r * r / C);
        float *dx = dinp + (size_t)n * C;
        for (int c = 0; c < C; c++) dx[c] += r * (one + weight[c]) * g[c] - k * x[c];
    }
    for (int n = 0; n < N && dweight; n++) {
        const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
        for (int c = 0; c < C; c++) dweight[c] += g[c] * x[c] * rstd[n];
    }
}

void mt_rope_tables(float *cos_table, float *sin_table, const float *inv_freq, int T, int D) {
    int half = D / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            // fp32 angle as transformers computes it (positions * inv_freq in fp32)
            float angle = (float)t * inv_freq[i];
            cos_table[(size_t)t * half + i] = cosf(angle);
            sin_table[(size_t)t * half + i] = sinf(angle);
        }
}

void mt_rope_forward_ref(float *out, const float *inp, const float *cos_table, const float *sin_table,
                         const int32_t *pos, int B, int T, int H, int D, int rotate) {
    int half = D / 2;
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                const float *x = inp + (((size_t)b * T + t) * H + h) * D;
                float *y = out + (((size_t)b * H + h) * T + t) * D;
                if (!rotate) {
                    memcpy(y, x, (size_t)D * sizeof(float));
                    continue;
                }
                size_t row = (size_t)(pos ? pos[(size_t)b * T + t] : t) * half;
                const float *c = cos_table + row, *s = sin_table + row;
                for (int i = 0; i < half; i++) {
                    y[i] = x[i] * c[i] - x[i + half] * s[i];
                    y[i + half] = x[i + half] * c[i] + x[i] * s[i];
                }
            }
}

void mt_rope_backward_ref(float *dinp, const float *dout, const float *cos_table, const float *sin_table,
                          const int32_t *pos, int B, int T, int H, int D, int rotate) {
    int half = D / 2;
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                float *dx = dinp + (((size_t)b * T + t) * H + h) * D;
                const float *dy = dout + (((size_t)b * H + h) * T + t) * D;
                if (!rotate) {
                    memcpy(dx, dy, (size_t)D * sizeof(float));
                    continue;
                }
                size_t row = (size_t)(pos ? pos[(size_t)b * T + t] : t) * half;
                const float *c = cos_table + row, *s = sin_table + row;
                for (int i = 0; i < half; i++) {
                    dx[i] = dy[i] * c[i] + dy[i + half] * s[i];
                    dx[i + half] = dy[i + half] * c[i] - dy[i] * s[i];
                }
            }
}

// The first key query t of row b sees: 0, or t - window + 1 with a sliding
// window, and never one before the start of t's document.
static int attention_first_key(int b, int t, int T, int window, const int32_t *pos) {
    int j0 = window > 0 && t >= window ? t - window + 1 : 0;
    int doc = pos ? t - pos[(size_t)b * T + t] : 0;
    return doc > j0 ? doc : j0;
}

// Softmax probabilities of query row t against keys j0..t into p[j0..t];
// returns the log-sum-exp of the scaled scores.
static float attention_probs(float *p, const float *qrow, const float *kbase, int j0, int t, int D, float scale) {
    float maxval = -INFINITY;
    for (int j = j0; j <= t; j++) {
        const float *krow = kbase + (size_t)j * D;
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += qrow[d] * krow[d];
        p[j] = s * scale;
        if (p[j] > maxval) maxval = p[j];
    }
    double sum = 0.0;
    for (int j = j0; j <= t; j++) {
        p[j] = expf(p[j] - maxval);
        sum += p[j];
    }
    float inv = (float)(1.0 / sum);
    for (int j = j0; j <= t; j++) p[j] *= inv;
    return maxval + (float)log(sum);
}

void mt_attention_forward_ref(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                              int H, int KV, int D, int window, const int32_t *pos, float scale) {
    int group = H / KV;
    if (scale == 0.0f) scale = 1.0f / sqrtf((float)D);
#pragma omp parallel
    {
        float *p = malloc((size_t)T * sizeof(float));
        MT_CHECK(p != NULL, "attention scratch");
#pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                const float *kbase = k + ((size_t)b * KV + h / group) * T * D;
                const float *vbase = v + ((size_t)b * KV + h / group) * T * D;
                for (int t = 0; t < T; t++) {
                    int j0 = attention_first_key(b, t, T, window, pos);
                    lse[((size_t)b * H + h) * T + t] =
                        attention_probs(p, q + (((size_t)b * H + h) * T + t) * D, kbase, j0, t, D, scale);
                    float *y = out + (((size_t)b * T + t) * H + h) * D;
                    for (int d = 0; d < D; d++) y[d] = 0.0f;
                    for (int j = j0; j <= t; j++)
                        for (int d = 0; d < D; d++) y[d] += p[j] * vbase[(size_t)j * D + d];
                }
            }
        free(p);
    }
}

void mt_kv_store_ref(float *kcache, float *vcache, const float *k, const float *v, const int32_t *pos, int B, int KV,
                     int D, int S) {
    for (int b = 0; b < B; b++)
        for (int h = 0; h < KV; h++) {
            size_t at = (((size_t)b * KV + h) * S + (size_t)pos[b]) * D, from = ((size_t)b * KV + h) * D;
            memcpy(kcache + at, k + from, (size_t)D * sizeof(float));
            memcpy(vcache + at, v + from, (size_t)D * sizeof(float));
        }
}

void mt_attention_decode_ref(float *out, const float *q, const float *kcache, const float *vcache, const int32_t *pos,
                             int B, int H, int KV, int D, int S, int window, float scale) {
    int group = H / KV;
    if (scale == 0.0f) scale = 1.0f / sqrtf((float)D);
    float *p = malloc((size_t)S * sizeof(float));
    MT_CHECK(p != NULL, "attention scratch");
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int t = pos[b], j0 = attention_first_key(0, t, S, window, NULL);
            const float *kbase = kcache + ((size_t)b * KV + h / group) * S * D;
            const float *vbase = vcache + ((size_t)b * KV + h / group) * S * D;
            attention_probs(p, q + ((size_t)b * H + h) * D, kbase, j0, t, D, scale);
            float *y = out + ((size_t)b * H + h) * D;
            for (int d = 0; d < D; d++) y[d] = 0.0f;
            for (int j = j0; j <= t; j++)
                for (int d = 0; d < D; d++) y[d] += p[j] * vbase[(size_t)j * D + d];
        }
    free(p);
}

void mt_attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, int B, int T, int H, int KV, int D,
                               int window, const int32_t *pos, float scale) {
    (void)out, (void)lse;
    int group = H / KV;
    if (scale == 0.0f) scale = 1.0f / sqrtf((float)D);
    memset(dk, 0, (size_t)B * KV * T * D * sizeof(float));
    memset(dv, 0, (size_t)B * KV * T * D * sizeof(float));
#pragma omp parallel
    {
        float *p = malloc(2 * (size_t)T * sizeof(float));
        MT_CHECK(p != NULL, "attention scratch");
        float *dp = p + T;
        // one kv head per task: its heads' dk/dv sums stay in one thread
#pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int kv = 0; kv < KV; kv++) {
                const float *kbase = k + ((size_t)b * KV + kv) * T * D;
                const float *vbase = v + ((size_t)b * KV + kv) * T * D;
                float *dkbase = dk + ((size_t)b * KV + kv) * T * D;
                float *dvbase = dv + ((size_t)b * KV + kv) * T * D;
                for (int h = kv * group; h < (kv + 1) * group; h++)
                    for (int t = 0; t < T; t++) {
                        const float *qrow = q + (((size_t)b * H + h) * T + t) * D;
                        const float *g = dout + (((size_t)b * T + t) * H + h) * D;
                        float *dqrow = dq + (((size_t)b * H + h) * T + t) * D;
                        int j0 = attention_first_key(b, t, T, window, pos);
                        attention_probs(p, qrow, kbase, j0, t, D, scale);
                        double pdp = 0.0;
                        for (int j = j0; j <= t; j++) {
                            float s = 0.0f;
                            for (int d = 0; d < D; d++) s += g[d] * vbase[(size_t)j * D + d];
                            dp[j] = s;
                            pdp += (double)p[j] * s;
                            for (int d = 0; d < D; d++) dvbase[(size_t)j * D + d] += p[j] * g[d];
                        }
                        for (int d = 0; d < D; d++) dqrow[d] = 0.0f;
                        for (int j = j0; j <= t; j++) {
                            float ds = p[j] * (dp[j] - (float)pdp) * scale;
                            for (int d = 0; d < D; d++) {
                                dqrow[d] += ds * kbase[(size_t)j * D + d];
                                dkbase[(size_t)j * D + d] += ds * qrow[d];
                            }
                        }
                    }
            }
        free(p);
    }
}

// GELU's tanh approximation (torch's gelu(approximate="tanh")): its value and
// derivative at g.
static const float kGeluK0 = 0.7978845608028654f, kGeluK1 = 0.044715f;  // sqrt(2/pi)
static float gelu_tanh(float g) { return 0.5f * g * (1.0f + tanhf(kGeluK0 * (g + kGeluK1 * g * g * g))); }
static float gelu_tanh_grad(float g) {
    float t = tanhf(kGeluK0 * (g + kGeluK1 * g * g * g));
    return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kGeluK0 * (1.0f + 3.0f * kGeluK1 * g * g);
}

void mt_glu_forward_ref(float *out, const float *gate, const float *up, size_t n, mt_act act) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = (act == MT_ACT_SILU ? g / (1.0f + expf(-g)) : gelu_tanh(g)) * up[i];
    }
}

void mt_glu_backward_ref(float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n,
                         mt_act act) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float g = gate[i], a, da;
        if (act == MT_ACT_SILU) {
            float sig = 1.0f / (1.0f + expf(-g));
            a = g * sig, da = sig + a * (1.0f - sig);
        } else {
            a = gelu_tanh(g), da = gelu_tanh_grad(g);
        }
        dgate[i] = dout[i] * up[i] * da;
        dup[i] = dout[i] * a;
    }
}

void mt_matmul_forward_ref(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                           int OUT) {
#pragma omp parallel for collapse(2)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            const float *x = inp + (size_t)n * IN, *w = weight + (size_t)o * IN;
            float sum = bias ? bias[o] : 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < IN; i++) sum += x[i] * w[i];
            out[(size_t)n * OUT + o] = sum;
        }
}

void mt_matmul_forward_add_ref(float *out, const float *inp, const float *weight, int N, int IN, int OUT, float alpha) {
#pragma omp parallel for collapse(2)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            const float *x = inp + (size_t)n * IN, *w = weight + (size_t)o * IN;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < IN; i++) sum += x[i] * w[i];
            out[(size_t)n * OUT + o] += alpha * sum;
        }
}

void mt_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                            const float *weight, int N, int IN, int OUT, float alpha, int accumulate) {
    if (dinp) {
#pragma omp parallel for
        for (int n = 0; n < N; n++) {
            float *dx = dinp + (size_t)n * IN;
            if (!accumulate) memset(dx, 0, (size_t)IN * sizeof(float));
            for (int o = 0; o < OUT; o++) {
                float g = alpha * dout[(size_t)n * OUT + o];
                const float *w = weight + (size_t)o * IN;
#pragma omp simd
                for (int i = 0; i < IN; i++) dx[i] += g * w[i];
            }
        }
    }
    if (dweight) {
#pragma omp parallel for
        for (int o = 0; o < OUT; o++) {
            float *dw = dweight + (size_t)o * IN;
            double db = 0.0;
            for (int n = 0; n < N; n++) {
                float g = alpha * dout[(size_t)n * OUT + o];
                db += g;
                const float *x = inp + (size_t)n * IN;
#pragma omp simd
                for (int i = 0; i < IN; i++) dw[i] += g * x[i];
            }
            if (dbias) dbias[o] += (float)db;
        }
    }
}

void mt_crossentropy_ref(float *losses, float *dlogits, const float *logits, const int32_t *targets, int N, int V,
                         float dscale) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float *dz = dlogits ? dlogits + (size_t)n * V : NULL;
        int target = targets[n];
        if (target < 0) {
            losses[n] = 0.0f;
            if (dz) memset(dz, 0, (size_t)V * sizeof(float));
            continue;
        }
        float maxval = -INFINITY;
        for (int i = 0; i < V; i++) maxval = z[i] > maxval ? z[i] : maxval;
        double sum = 0.0;
        for (int i = 0; i < V; i++) sum += exp((double)z[i] - maxval);
        float logsum = (float)log(sum) + maxval;
        losses[n] = logsum - z[target];
        if (dz) {
            for (int i = 0; i < V; i++) dz[i] = expf(z[i] - logsum) * dscale;
            dz[target] -= dscale;
        }
    }
}

void mt_add_ref(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void mt_adamw_ref(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float bias_correction1, float bias_correction2, float grad_scale) {
    float step_size = lr / bias_correction1, bc2_sqrt = sqrtf(bias_correction2);
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        float p = param[i] * (1.0f - lr * weight_decay);
        param[i] = p - step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
}

double mt_sumsq_ref(const float *x, size_t n) {
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum)
    for (size_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
    return sum;
}

void mt_cast_bf16_ref(uint16_t *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = mt_f32_to_bf16(inp[i]);
}

// Dropout's masks and the z streams are drawn a group of 4 indices at a
// time: groups [offset / 4, (offset + n + 3) / 4) cover elements j < n,
// whose index is offset + j.
static uint64_t first_group(uint64_t offset) { return offset / 4; }
static uint64_t end_group(size_t n, uint64_t offset) { return (offset + n + 3) / 4; }

void mt_dropout_ref(float *out, const float *inp, size_t n, float p, uint64_t seed, uint64_t offset, int accumulate) {
    float keep_scale = 1.0f / (1.0f - p);
    uint32_t threshold = mt_dropout_threshold(p);
#pragma omp parallel for
    for (uint64_t g = first_group(offset); g < end_group(n, offset); g++) {
        unsigned keep = mt_dropout_keep4(seed, g, threshold);
        for (uint64_t i = g * 4; i < g * 4 + 4; i++) {
            if (i < offset || i >= offset + n) continue;
            size_t j = i - offset;
            float kept = keep >> (i - g * 4) & 1 ? inp[j] * keep_scale : 0.0f;
            out[j] = accumulate ? out[j] + kept : kept;
        }
    }
}

void mt_perturb_ref(float *dst, const float *src, size_t n, float scale, uint64_t seed, uint64_t offset) {
#pragma omp parallel for
    for (uint64_t g = first_group(offset); g < end_group(n, offset); g++) {
        float z[4];
        mt_rng_gauss4(seed, g, z);
        for (uint64_t i = g * 4; i < g * 4 + 4; i++)
            if (i >= offset && i < offset + n) dst[i - offset] = src[i - offset] + scale * z[i - g * 4];
    }
}

void mt_perturb_rows_ref(float *x, const int32_t *tokens, int N, int C, float scale, uint64_t seed, uint64_t offset) {
#pragma omp parallel for
    for (int row = 0; row < N; row++)
        for (int c = 0; c < C; c++)
            x[(size_t)row * C + c] += scale * mt_rng_gauss(seed, offset + (uint64_t)tokens[row] * C + (uint64_t)c);
}

void mt_zo_update_ref(float *w, size_t n, uint64_t offset, int count, const uint64_t *seeds, const float *coefs,
                      float lr, float weight_decay) {
#pragma omp parallel for
    for (uint64_t g = first_group(offset); g < end_group(n, offset); g++) {
        float step[4] = {0, 0, 0, 0}, z[4];
        for (int k = 0; k < count; k++) {
            mt_rng_gauss4(seeds[k], g, z);
            for (int q = 0; q < 4; q++) step[q] += coefs[k] * z[q];
        }
        for (uint64_t i = g * 4; i < g * 4 + 4; i++) {
            if (i < offset || i >= offset + n) continue;
            float *p = &w[i - offset];
            *p -= lr * (step[i - g * 4] + weight_decay * *p);
        }
    }
}

// ------------------------------------------------- GaLore's Adam and update

// The 8-bit maps (ops.h): decade d of D holds 2^(D-1-d) magnitudes spread
// linearly over (10^-(d+1), 10^-d].
static float qmap_tables[2][256];
// For each map and each 16-bit prefix of a float's bits (sign, exponent, 7
// mantissa bits), the last code whose value is at most the least float with
// that prefix: where mt_qmap_encode's search starts (a lower bound of the
// answer for every float with the prefix; at most a few codes from it).
static uint8_t qmap_start[2][65536];
// The same search without the map: mt_qmap_nearest never decreases as x
// grows, so its code is the count of thresholds at most x. qmap_up[t][c]: the
// least float whose code exceeds c (NaN for 255: never reached);
// qmap_code_start[t][p]: the code of prefix p's least float; qmap_up_steps:
// the most codes any non-NaN prefix spans past it (at most 1: one compare).
static float qmap_up[2][256];
static uint8_t qmap_code_start[2][65536 + 4];  // (4 bytes of padding: a vector gather reads 4 from any prefix)
static int qmap_up_steps[2];
static pthread_once_t qmap_once = PTHREAD_ONCE_INIT;

static int decade_magnitudes(double *out, int decades) {
    int count = 0;
    for (int d = decades - 1; d >= 0; d--) {
        int levels = 1 << (decades - 1 - d);
        for (int j = 0; j < levels; j++) out[count++] = pow(10.0, -d) * (0.1 + 0.9 * (j + 1) / levels);
    }
    return count;
}

// A float's bits as a key that orders as its value (-0 just below +0).
static uint32_t ordered_key(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b & 0x80000000u ? ~b : b | 0x80000000u;
}

static float key_float(uint32_t key) {
    uint32_t b = key & 0x80000000u ? key & 0x7FFFFFFFu : ~key;
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

static void build_qmaps(void) {
    double mag[255];
    int n = decade_magnitudes(mag, 7);  // 127
    float *s = qmap_tables[1];
    for (int i = 0; i < n; i++) s[i] = (float)-mag[n - 1 - i];
    s[n] = 0.0f;
    for (int i = 0; i < n; i++) s[n + 1 + i] = (float)mag[i];
    s[255] = 1.0f;                  // 255 distinct values; the last code repeats 1
    n = decade_magnitudes(mag, 8);  // 255
    float *u = qmap_tables[0];
    u[0] = 0.0f;
    for (int i = 0; i < n; i++) u[1 + i] = (float)mag[i];
    for (int t = 0; t < 2; t++)
        for (uint32_t p = 0; p < 65536; p++) {
            // the least and the greatest float with prefix p: the rest of their bits 0 and 1 when positive, 1
            // and 0 when negative (larger magnitude, smaller value); the start is the least's floor, and the
            // greatest's code lies the most codes past the least's
            uint32_t low = p & 0x8000 ? 0xFFFFu : 0u, bits[2] = {p << 16 | low, p << 16 | (low ^ 0xFFFFu)};
            float least, greatest;
            memcpy(&least, &bits[0], sizeof least);
            memcpy(&greatest, &bits[1], sizeof greatest);
            qmap_start[t][p] = mt_qmap_floor(qmap_tables[t], least);
            qmap_code_start[t][p] = mt_qmap_nearest(qmap_tables[t], least);
            int steps = (int)mt_qmap_nearest(qmap_tables[t], greatest) - qmap_code_start[t][p];
            if (least == least && greatest == greatest && steps > qmap_up_steps[t]) qmap_up_steps[t] = steps;
        }
    for (int t = 0; t < 2; t++) {
        for (int c = 0; c < 255; c++) {
            // bisection over the floats from -inf to +inf in value order (their bits as ordered keys); the
            // code of +inf is 255, so one exists
            uint32_t lo = ordered_key(-INFINITY), hi = ordered_key(INFINITY);
            while (lo < hi) {
                uint32_t mid = lo + (hi - lo) / 2;
                if (mt_qmap_nearest(qmap_tables[t], key_float(mid)) > c)
                    hi = mid;
                else
                    lo = mid + 1;
            }
            qmap_up[t][c] = key_float(lo);
        }
        qmap_up[t][255] = NAN;
    }
}

const uint8_t *mt_qmap_thresholds(int is_signed, const float **up, int *most_steps) {
    pthread_once(&qmap_once, build_qmaps);
    *up = qmap_up[is_signed ? 1 : 0];
    *most_steps = qmap_up_steps[is_signed ? 1 : 0];
    return qmap_code_start[is_signed ? 1 : 0];
}

const float *mt_qmap(int is_signed) {
    pthread_once(&qmap_once, build_qmaps);
    return qmap_tables[is_signed ? 1 : 0];
}

// Map t's code for x: mt_qmap_nearest's, found from the table of x's 16-bit
// prefix instead of by bisection (the same code for every x:
// tests/test_galore.c).
static inline uint8_t qmap_code(int t, float x) {
    const float *map = qmap_tables[t];
    if (!(x > map[0])) return 0;  // (NaN too, as the bisection gives)
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int lo = qmap_start[t][bits >> 16];
    while (lo < 255 && map[lo + 1] <= x) lo++;  // rarely a step (at most one for these maps)
    return mt_qmap_round(map, x, lo);
}

uint8_t mt_qmap_encode(const float *map, float x) {
    int t = map == qmap_tables[0] ? 0 : map == qmap_tables[1] ? 1 : -1;
    return t < 0 ? mt_qmap_nearest(map, x) : qmap_code(t, x);
}

size_t mt_adam_state_bytes(size_t n, int int8) {
    if (!int8) return 2 * n * sizeof(float);
    return 2 * (n + 2 * ((n + MT_QBLOCK - 1) / MT_QBLOCK) * sizeof(float));
}

void mt_adam_direction_ref(float *dir, const float *grad, const mt_adam_state *s, size_t n, float beta1, float beta2,
                           float eps, float bias_correction1, float bias_correction2) {
    float bc2_sqrt = sqrtf(bias_correction2);
    if (s->m) {
#pragma omp parallel for
        for (size_t i = 0; i < n; i++) {
            float g = grad[i];
            float m = beta1 * s->m[i] + (1.0f - beta1) * g;
            float v = beta2 * s->v[i] + (1.0f - beta2) * g * g;
            s->m[i] = m, s->v[i] = v;
            dir[i] = (m / bias_correction1) / (sqrtf(v) / bc2_sqrt + eps);
        }
        return;
    }
    size_t blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        size_t i0 = b * MT_QBLOCK, len = n - i0 < MT_QBLOCK ? n - i0 : MT_QBLOCK;
        float m[MT_QBLOCK], v[MT_QBLOCK];
        mt_qblock_decode(s->mq + i0, s->vq + i0, s->m_absmax[b], s->v_absmax[b], m, v, len);
        for (size_t k = 0; k < len; k++) {
            size_t i = i0 + k;
            float g = grad[i];
            m[k] = beta1 * m[k] + (1.0f - beta1) * g;
            v[k] = beta2 * v[k] + (1.0f - beta2) * g * g;
            dir[i] = (m[k] / bias_correction1) / (sqrtf(v[k]) / bc2_sqrt + eps);
        }
        mt_qblock_encode(m, v, len, s->mq + i0, s->vq + i0, &s->m_absmax[b], &s->v_absmax[b]);
    }
}

void mt_qblock_decode(const uint8_t *mq, const uint8_t *vq, float m_absmax, float v_absmax, float *m, float *v,
                      size_t len) {
    const float *smap = mt_qmap(1), *umap = mt_qmap(0);
    for (size_t k = 0; k < len; k++) m[k] = smap[mq[k]] * m_absmax, v[k] = umap[vq[k]] * v_absmax;
}

void mt_qblock_encode(const float *m, const float *v, size_t len, uint8_t *mq, uint8_t *vq, float *m_absmax,
                      float *v_absmax) {
    pthread_once(&qmap_once, build_qmaps);
    // the absmax as fmaxf gives it (a NaN never wins), in plain compares the compiler vectorizes
    float m_max = 0.0f, v_max = 0.0f;
    for (size_t k = 0; k < len; k++) {
        float a = fabsf(m[k]);
        m_max = a > m_max ? a : m_max;
        v_max = v[k] > v_max ? v[k] : v_max;
    }
    *m_absmax = m_max, *v_absmax = v_max;
    for (size_t k0 = 0; k0 < len; k0 += MT_QBLOCK) {
        size_t n = len - k0 < MT_QBLOCK ? len - k0 : MT_QBLOCK;
        float sm[MT_QBLOCK], sv[MT_QBLOCK];  // the scaled values, divided as one vector loop
        for (size_t k = 0; k < n; k++)
            sm[k] = m_max > 0.0f ? m[k0 + k] / m_max : 0.0f, sv[k] = v_max > 0.0f ? v[k0 + k] / v_max : 0.0f;
        for (size_t k = 0; k < n; k++) {
            mq[k0 + k] = qmap_code(1, sm[k]);
            uint8_t code = qmap_code(0, sv[k]);
            vq[k0 + k] = code == 0 && v[k0 + k] > 0.0f ? 1 : code;  // a nonzero v never decodes to 0
        }
    }
}

void mt_apply_update_ref(float *w, const float *update, size_t n, float lr, float scale, float weight_decay) {
    float keep = 1.0f - lr * weight_decay, step = lr * scale;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) w[i] = w[i] * keep - step * update[i];
}

void mt_gauss_ref(float *dst, size_t n, uint64_t seed) {
#pragma omp parallel for
    for (size_t g = 0; g < (n + 3) / 4; g++) {
        float z[4];
        mt_rng_gauss4(seed, g, z);
        for (size_t q = 0; q < 4 && 4 * g + q < n; q++) dst[4 * g + q] = z[q];
    }
}
