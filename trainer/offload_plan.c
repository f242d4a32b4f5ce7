// trainer/offload_plan.c: see offload_plan.h.
#include "trainer/offload_plan.h"

#include <stdlib.h>
#include <string.h>

mt_offload_plan mt_offload_plan_make(const mt_param_info *table, int n, size_t lo, size_t hi,
                                     const unsigned char *projected, int L) {
    mt_offload_plan p = {malloc((size_t)(n ? n : 1) * sizeof *p.params), 0, projected != NULL,
                         malloc((size_t)(n ? n : 1) * sizeof *p.index), 0};
    MT_CHECK(p.params && p.index, "offload plan");
    for (int i = 0; i < n; i++) {
        size_t a = table[i].offset, b = a + table[i].count;
        p.index[i] = -1;
        if ((projected && projected[i]) || !mt_range_clip(&a, &b, lo, hi)) continue;
        p.index[i] = p.n;
        p.params[p.n++] = (mt_offload_param){a, b - a, table[i].decay, mt_param_forward_unit(table[i].name, L),
                                             projected ? p.count : a - lo};
        p.count += b - a;
    }
    if (!projected) p.count = hi - lo;
    return p;
}

void mt_offload_plan_free(mt_offload_plan *p) {
    free(p->params);
    free(p->index);
}

// Packed state arrays <-> the weights' layout.
void mt_offload_plan_scatter(const mt_offload_plan *p, const float *packed, float *weights_layout) {
    for (int k = 0; k < p->n; k++)
        memcpy(weights_layout + p->params[k].offset, packed + p->params[k].slot, p->params[k].count * sizeof(float));
}

void mt_offload_plan_gather(const mt_offload_plan *p, const float *weights_layout, float *packed) {
    for (int k = 0; k < p->n; k++)
        memcpy(packed + p->params[k].slot, weights_layout + p->params[k].offset, p->params[k].count * sizeof(float));
}

// The packed parameters' moments as checkpoint tensors, over m and v.
mt_state_tensor *mt_offload_plan_moments(const mt_offload_plan *p, const mt_param_info *table, int n, float *m,
                                         float *v) {
    mt_state_tensor *t = malloc((size_t)(2 * p->n + 1) * sizeof *t);
    MT_CHECK(t != NULL, "offload checkpoint tensors");
    for (int i = 0, k = 0; i < n; i++) {
        if (p->index[i] < 0) continue;
        const mt_offload_param *q = &p->params[p->index[i]];
        t[k++] = (mt_state_tensor){table[i].name, "exp_avg", 0, q->count, m + q->slot, NULL};
        t[k++] = (mt_state_tensor){table[i].name, "exp_avg_sq", 0, q->count, v + q->slot, NULL};
    }
    return t;
}

int mt_offload_plan_codes(const mt_offload_plan *p, const mt_param_info *table, int n, const mt_store *st,
                          mt_state_tensor *tensors, int at) {
    int k = at;
    for (int i = 0; i < n; i++) {
        if (p->index[i] < 0) continue;
        const mt_offload_param *q = &p->params[p->index[i]];
        mt_store_codes c;
        if (!mt_store_segment_codes(st, q->slot, q->slot + q->count, &c)) return 0;
        // (the store's arrays, read only by the checkpoint's writer)
        tensors[k++] = (mt_state_tensor){table[i].name, "exp_avg_q8", 1, q->count, (void *)c.mq, NULL};
        tensors[k++] = (mt_state_tensor){table[i].name, "exp_avg_sq_q8", 1, q->count, (void *)c.vq, NULL};
        tensors[k++] = (mt_state_tensor){table[i].name, "exp_avg_absmax", 0, c.blocks, (void *)c.m_absmax, NULL};
        tensors[k++] = (mt_state_tensor){table[i].name, "exp_avg_sq_absmax", 0, c.blocks, (void *)c.v_absmax, NULL};
    }
    return 1;
}
