// trainer/plan.c: a run's decisions and the checks of the combination
// (plan.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/plan.h"

#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "offload/offload.h"
#include "trainer/lora.h"

int mt_plan_select(const char *patterns, const mt_param_info *table, int n, unsigned char *selected) {
    int count = 0;
    for (int i = 0; i < n; i++) {
        selected[i] = 0;
        const char *cursor = patterns, *item;
        size_t len;
        while (!selected[i] && mt_list_next_item(&cursor, &item, &len)) {
            char pattern[256];
            snprintf(pattern, sizeof pattern, "%.*s", (int)len, item);
            selected[i] = fnmatch(pattern, table[i].name, 0) == 0;
        }
        count += selected[i];
    }
    return count;
}

// Offload with accumulation: whether host memory sums the micro-batches'
// gradients (offload.grad_sum; auto: mt_offload_host_sum_fits with this
// node's memory); need and have (bytes) say what was weighed.
static int sum_on_host(const mt_config *cfg, int use_gpu, size_t total, size_t shard, int local_ranks, double *need,
                       double *have) {
    if (strcmp(cfg->offload_grad_sum, "auto")) return !strcmp(cfg->offload_grad_sum, "host");
    if (!use_gpu) return 1;  // the CPU backend's fp32 gradient buffer is the sum: nothing more
    *have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    return mt_offload_host_sum_fits(!strcmp(cfg->offload_optimizer, "cpu"), total, shard, local_ranks, *have, need);
}

// lora.init: the adapter must have the configured shape.
static mt_err check_lora_init(const mt_config *cfg, const mt_model_config *mc, const mt_lora_config *lora) {
    mt_lora_config from;
    mt_err err = mt_lora_read_config(cfg->lora_init, &from);
    if (err) return err;
    if (from.r == lora->r && from.alpha == lora->alpha && from.targets == lora->targets && from.rslora == lora->rslora)
        return MT_OK;
    char want[128], have[128];
    mt_lora_format_targets(mc, lora->targets, want, sizeof want);
    mt_lora_format_targets(mc, from.targets, have, sizeof have);
    return mt_errorf(MT_ERR_CONFIG,
                     "lora.init %s has r=%d alpha=%g targets=%s rslora=%d, but the config asks for r=%d "
                     "alpha=%g targets=%s rslora=%d; set lora.* to the adapter's values",
                     cfg->lora_init, from.r, from.alpha, have, from.rslora, lora->r, lora->alpha, want, lora->rslora);
}

// What MeZO perturbs (mezo.trainable) or GaLore projects (galore.targets).
static mt_err select_trained(mt_plan *p, const mt_config *cfg) {
    int n = p->n_trained;
    const mt_param_info *t = p->trained;
    p->selected = calloc((size_t)(n ? n : 1), 1);
    MT_CHECK(p->selected != NULL, "selection");
    p->n_selected = n;
    if (p->mezo) {
        p->n_selected = mt_plan_select(cfg->mezo_trainable, t, n, p->selected);
        if (p->n_selected == 0)
            return mt_errorf(MT_ERR_CONFIG,
                             "mezo.trainable '%s' matches none of the %d trainable parameters (they are named like "
                             "%s); use * for all",
                             cfg->mezo_trainable, n, n ? t[n - 1].name : "?");
    }
    if (p->galore) {
        p->n_selected = mt_plan_select(cfg->galore_targets, t, n, p->selected);
        for (int i = 0; i < n; i++)
            if (p->selected[i] && t[i].ndim != 2)
                return mt_errorf(MT_ERR_CONFIG,
                                 "galore.targets '%s' matches %s, a vector; GaLore projects matrices (the default "
                                 "is *.self_attn.*_proj.weight,*.mlp.*_proj.weight)",
                                 cfg->galore_targets, t[i].name);
        if (p->n_selected == 0)
            return mt_errorf(MT_ERR_CONFIG,
                             "galore.targets '%s' matches none of the model's matrices (they are named like "
                             "model.layers.0.self_attn.q_proj.weight)",
                             cfg->galore_targets);
    }
    return MT_OK;
}

// The backend: the GPU unless train.device is cpu or none is visible.
static mt_err choose_device(mt_plan *p, const mt_config *cfg, int ngpu) {
    int want_gpu = !strcmp(cfg->train_device, "gpu");
    p->use_gpu = strcmp(cfg->train_device, "cpu") && ngpu > 0;
    if (want_gpu && ngpu == 0)
        return mt_errorf(MT_ERR_DEVICE, "train.device is gpu but no GPU is visible%s; set train.device: auto or cpu",
#ifdef MT_HAVE_CUDA
                         ""
#else
                         " (this memtune was built without CUDA)"
#endif
        );
    if (p->use_gpu && p->local_world > ngpu)
        return mt_errorf(MT_ERR_DEVICE,
                         "%d ranks run on this node but it has %d GPU%s: start at most %d per node (mpirun -np %d, or "
                         "a hostfile's slots)",
                         p->local_world, ngpu, ngpu == 1 ? "" : "s", ngpu, ngpu);
    return MT_OK;
}

// offload.ratio: the state of the first whole forward units (the trained
// block holds them in order) that fit in 1 - ratio of it stays on the backend.
static void split_state(mt_plan *p, double ratio, int L) {
    double keep = (1.0 - ratio) * (double)p->trained_total;
    int unit = -1;
    for (int i = 0; i < p->n_trained; i++) {
        int u = mt_param_forward_unit(p->trained[i].name, L);
        if (u == unit) continue;
        if (u < unit || (double)p->trained[i].offset > keep) break;  // (units after it must all be offloaded)
        p->offload_split = p->trained[i].offset, p->resident_units = u, unit = u;
    }
}

mt_err mt_plan_make(mt_plan *p, const mt_config *cfg, const mt_model_config *mc, mt_dist *dist, int ngpu) {
    memset(p, 0, sizeof *p);
    p->B = (int)cfg->train_micro_batch, p->T = (int)cfg->train_seq_len, p->accum = (int)cfg->train_grad_accum;
    p->mezo = !strcmp(cfg->optim_kind, "mezo"), p->galore = !strcmp(cfg->optim_kind, "galore");
    p->offload = strcmp(cfg->offload_optimizer, "none") != 0;
    p->rank = mt_dist_rank(dist), p->world = mt_dist_world(dist), p->local_world = mt_dist_local_world(dist);
    // ZeRO with one process changes only the code path (tests compare it)
    p->zero = (int)cfg->dist_zero_stage;
    mt_err err = MT_OK;
    if (cfg->lora_r > 0) {
        p->lora = 1;
        p->lora_cfg = (mt_lora_config){(int)cfg->lora_r, (float)cfg->lora_alpha, (float)cfg->lora_dropout,
                                       (int)cfg->lora_rslora, 0};
        err = mt_lora_parse_targets(cfg->lora_targets, &p->lora_cfg.targets);
        unsigned t = p->lora_cfg.targets, qkv = 1u << MT_LORA_Q | 1u << MT_LORA_K | 1u << MT_LORA_V,
                 gate_up = 1u << MT_LORA_GATE | 1u << MT_LORA_UP;
        if (!err && mc->fused && (((t & qkv) && (t & qkv) != qkv) || ((t & gate_up) && (t & gate_up) != gate_up)))
            err = mt_errorf(MT_ERR_CONFIG,
                            "lora.targets %s: %s fuses q, k, v into qkv_proj and gate, up into gate_up_proj, and "
                            "an adapter covers a whole module; target qkv_proj, o_proj, gate_up_proj, down_proj "
                            "(or all-linear)",
                            cfg->lora_targets, mc->architecture);
        if (!err && cfg->lora_init[0]) err = check_lora_init(cfg, mc, &p->lora_cfg);
        if (err) return err;
    }
    p->table = mt_model_param_table(mc, &p->n_params, &p->total);
    p->n_trained = p->n_params, p->trained_total = p->total, p->trained = p->table;
    if (p->lora) p->trained = mt_lora_param_table(mc, &p->lora_cfg, &p->n_trained, &p->trained_total);
    p->shard_lo = 0, p->shard_hi = p->trained_total;
    if (p->zero) mt_dist_shard(dist, p->rank, p->trained_total, &p->shard_lo, &p->shard_hi);
    if ((err = select_trained(p, cfg)) || (err = choose_device(p, cfg, ngpu))) {
        mt_plan_free(p);
        return err;
    }
    // ZeRO-2 streams a full fine-tune's gradients into the shards; with
    // offload, ZeRO-1 too: each rank's store updates its shard only, so a
    // whole all-reduced gradient would serve nothing but to cost 4 bytes a
    // parameter on the GPU and twice the traffic. (Not GaLore's: its hook
    // takes each gradient to the parameter's owner, whatever the stage.)
    p->zero2_streamed = !p->lora && !p->galore && (p->zero == 2 || (p->zero == 1 && p->offload));
    // offloaded gradients stream out of backward, every micro-batch's when
    // the host sums them (offload.grad_sum), unless they are the adapters'
    // (one small block) (with GaLore, which passes on what it does not
    // project) (with ZeRO, mt_zero2_hook hands over the shard's reduced parts)
    p->host_sum =
        p->offload && !p->lora && p->accum > 1 &&
        sum_on_host(cfg, p->use_gpu, p->total, p->shard_hi - p->shard_lo, p->local_world, &p->host_need, &p->host_have);
    p->offload_streamed = p->offload && !p->lora && (p->accum == 1 || p->host_sum);
    if (p->offload && cfg->offload_ratio < 1) split_state(p, cfg->offload_ratio, mc->L);
    return MT_OK;
}

void mt_plan_free(mt_plan *p) {
    if (p->trained != p->table) free(p->trained);
    free(p->table);
    free(p->selected);
    p->table = p->trained = NULL, p->selected = NULL;
}

mt_base_load mt_plan_base_load(const mt_plan *p, int resuming) {
    if (p->offload && !p->galore && !p->lora) return MT_LOAD_UNITS;
    return p->lora || (p->mezo && !resuming) ? MT_LOAD_TENSORS : MT_LOAD_WHOLE;
}

mt_model_options mt_plan_model_options(const mt_plan *p, const mt_config *cfg) {
    return (mt_model_options){
        .B = p->B,
        .T = p->T,
        .activation_checkpointing = (int)cfg->model_activation_checkpointing,
        .lora = p->lora_cfg,
        .quantize_nf4 = !strcmp(cfg->model_quantize, "nf4"),
        .offload_activations = (int)cfg->model_offload_activations,
        .gpu_layer_inputs = (int)cfg->model_gpu_layer_inputs,
        .ssd_layer_inputs = (int)cfg->model_ssd_layer_inputs,
        .activations_dir = cfg->model_ssd_layer_inputs > 0 ? cfg->offload_path : NULL,
        .forward_only = p->mezo,
        .document_mask = (int)cfg->data_document_mask,
        .stream_weights = !strcmp(cfg->model_weights, "cpu") || !strcmp(cfg->model_weights, "ssd"),
        .weights_dir = !strcmp(cfg->model_weights, "ssd") ? cfg->offload_path : NULL,
        .resident_layers = (int)cfg->model_resident_layers,
        .mlp_tile_rows = (int)cfg->model_mlp_tile_rows,
        .attention_nondeterministic = !strcmp(cfg->model_deterministic_attention, "false")};
}
