// trainer/metrics.c: the progress line, metrics.jsonl and loss.svg
// (metrics.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/metrics.h"

#include "datasets/hf_tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mt_metrics {
    mt_metrics_config cfg;
    FILE *file;  // metrics.jsonl (rank 0)
    float *loss_curve, *eval_curve;
    int *eval_steps, evals;
    double t_start, t_last;
    long tokens_since;
};

static void format_duration(double s, char *buf, size_t len) {
    if (!isfinite(s) || s < 0)
        snprintf(buf, len, "?");
    else if (s < 60)
        snprintf(buf, len, "%.0fs", s);
    else if (s < 3600)
        snprintf(buf, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

// The run's loss curve as an SVG line chart (train loss per step, eval loss
// as dots), written next to metrics.jsonl; a picture needs no plotting tool.
// Steps without a loss (before a resume's first step) are NAN and left out.
static void write_loss_svg(const char *path, const float *loss, int steps, const float *eval, const int *eval_step,
                           int evals) {
    FILE *f = fopen(path, "w");
    if (!f || steps < 1) {
        if (f) fclose(f);
        return;
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < steps; i++)
        if (isfinite(loss[i])) lo = fminf(lo, loss[i]), hi = fmaxf(hi, loss[i]);
    for (int i = 0; i < evals; i++) lo = fminf(lo, eval[i]), hi = fmaxf(hi, eval[i]);
    if (!isfinite(lo)) lo = 0.0f, hi = 1.0f;
    if (hi - lo < 1e-6f) hi = lo + 1.0f;
    const double W = 640, H = 360, L = 60, R = 20, T = 20, Bm = 40;
    double xs = (W - L - R) / (steps > 1 ? steps - 1 : 1), ys = (H - T - Bm) / (hi - lo);
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
            "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            W, H);
    fprintf(f, "<path d=\"M%.0f %.0f V%.0f H%.0f\" stroke=\"black\" fill=\"none\"/>\n", L, T, H - Bm, W - R);
    for (int k = 0; k <= 4; k++) {
        double v = lo + (hi - lo) * k / 4, y = H - Bm - (v - lo) * ys;
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n", L - 6, y + 4, v);
    }
    fprintf(f,
            "<text x=\"%.0f\" y=\"%.0f\">step 1</text><text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">step %d</text>\n",
            L, H - Bm + 16, W - R, H - Bm + 16, steps);
    fprintf(f, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
    for (int i = 0; i < steps; i++)
        if (isfinite(loss[i])) fprintf(f, "%.1f,%.1f ", L + i * xs, H - Bm - (loss[i] - lo) * ys);
    fprintf(f, "\"/>\n");
    for (int i = 0; i < evals; i++)
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"#d62728\"/>\n", L + (eval_step[i] - 1) * xs,
                H - Bm - (eval[i] - lo) * ys);
    fprintf(f,
            "<text x=\"%.0f\" y=\"14\" fill=\"#1f77b4\">train loss</text><text x=\"%.0f\" y=\"14\" "
            "fill=\"#d62728\">eval loss</text>\n</svg>\n",
            L + 10, L + 100);
    fclose(f);
}

// A resumed run continues metrics.jsonl from the checkpoint: records past
// its step (written before an interruption) are dropped.
static mt_err trim_metrics(const char *path, long last_step) {
    FILE *in = fopen(path, "r");
    if (!in) return MT_OK;
    char tmp[1300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = fopen(tmp, "w");
    if (!out) {
        fclose(in);
        return mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", tmp, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, in) > 0) {
        cJSON *rec = cJSON_Parse(line);
        const cJSON *step = rec ? cJSON_GetObjectItemCaseSensitive(rec, "step") : NULL;
        if (cJSON_IsNumber(step) && step->valuedouble <= (double)last_step) fputs(line, out);
        cJSON_Delete(rec);
    }
    free(line);
    fclose(in);
    int ok = fclose(out) == 0 && rename(tmp, path) == 0;
    return ok ? MT_OK : mt_errorf(MT_ERR_IO, "%s: cannot rewrite (%s)", path, strerror(errno));
}

mt_err mt_metrics_open(mt_metrics **out, const mt_metrics_config *c) {
    *out = NULL;
    mt_metrics *m = calloc(1, sizeof *m);
    MT_CHECK(m != NULL, "metrics");
    m->cfg = *c;
    int most = (int)(c->eval_every > 0 ? c->steps / c->eval_every : 0) + 1;
    m->loss_curve = malloc((size_t)(c->steps > 0 ? c->steps : 1) * sizeof(float));
    m->eval_curve = malloc((size_t)most * sizeof(float));
    m->eval_steps = malloc((size_t)most * sizeof(int));
    MT_CHECK(m->loss_curve && m->eval_curve && m->eval_steps, "metrics curves");
    for (long i = 0; i < c->steps; i++) m->loss_curve[i] = NAN;
    mt_err err = MT_OK;
    if (c->write) {
        char path[1200];
        snprintf(path, sizeof path, "%s/metrics.jsonl", c->dir);
        if (c->first_step > 0) err = trim_metrics(path, c->first_step);
        if (!err && !(m->file = fopen(path, c->first_step > 0 ? "a" : "w")))
            err = mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", path, strerror(errno));
    }
    if (err) {
        mt_metrics_close(m, 0);
        return err;
    }
    m->t_start = m->t_last = mt_now();
    *out = m;
    return MT_OK;
}

double mt_metrics_step(mt_metrics *m, const mt_step_record *r) {
    const mt_metrics_config *c = &m->cfg;
    int step = r->step, last = step + 1 == c->steps;
    m->loss_curve[step] = (float)r->loss;
    m->tokens_since += r->tokens;
    if (isfinite(r->eval_loss)) {
        m->eval_curve[m->evals] = (float)r->eval_loss;
        m->eval_steps[m->evals++] = step + 1;
    }
    if ((step + 1) % c->log_every != 0 && !last && !isfinite(r->eval_loss)) return NAN;
    double now = mt_now(), tps = m->tokens_since / (now - m->t_last + 1e-9);
    char eta[32], evaltext[48] = "";
    format_duration((now - m->t_start) / (step + 1) * (c->steps - step - 1), eta, sizeof eta);
    if (isfinite(r->eval_loss)) snprintf(evaltext, sizeof evaltext, " | eval %.4f", r->eval_loss);
    if (c->write)
        fprintf(stderr,
                "step %*d/%ld | loss %.4f%s | lr %.2e | %s %.3f | %.0f tok/s | peak mem %.2f GiB | "
                "ETA %s\n",
                (int)(log10((double)c->steps) + 1), step + 1, c->steps, r->loss, evaltext, r->lr,
                c->zeroth_order ? "proj grad" : "grad norm", r->grad, tps, r->peak_bytes / 1073741824.0, eta);
    cJSON *rec = cJSON_CreateObject();
    cJSON_AddNumberToObject(rec, "step", step + 1);
    cJSON_AddNumberToObject(rec, "loss", r->loss);
    if (isfinite(r->eval_loss)) cJSON_AddNumberToObject(rec, "eval_loss", r->eval_loss);
    cJSON_AddNumberToObject(rec, "lr", r->lr);
    cJSON_AddNumberToObject(rec, c->zeroth_order ? "projected_grad_rms" : "grad_norm", r->grad);
    cJSON_AddNumberToObject(rec, "tokens_per_second", tps);
    if (isfinite(r->refresh_seconds)) cJSON_AddNumberToObject(rec, "projector_refresh_seconds", r->refresh_seconds);
    cJSON_AddNumberToObject(rec, "peak_memory_bytes", (double)r->peak_bytes);
    cJSON_AddNumberToObject(rec, "elapsed_seconds", now - m->t_start);
    char *line = cJSON_PrintUnformatted(rec);
    if (m->file) {
        fprintf(m->file, "%s\n", line);
        fflush(m->file);
    }
    free(line);
    cJSON_Delete(rec);
    m->t_last = now;
    m->tokens_since = 0;
    return tps;
}

void mt_metrics_close(mt_metrics *m, int steps_done) {
    if (!m) return;
    if (m->file) fclose(m->file);
    if (m->cfg.write && steps_done > 0) {
        char path[1200];
        snprintf(path, sizeof path, "%s/loss.svg", m->cfg.dir);
        write_loss_svg(path, m->loss_curve, steps_done, m->eval_curve, m->eval_steps, m->evals);
    }
    free(m->loss_curve);
    free(m->eval_curve);
    free(m->eval_steps);
    free(m);
}

void mt_metrics_sample(mt_metrics *m, int step, const char *prompt, const char *raw) {
    // an untrained model's bytes: valid UTF-8 for the JSON, no control characters for the terminal
    size_t len;
    char *text = mt_utf8_sanitize(raw, strlen(raw), &len), *shown = strdup(text);
    MT_CHECK(shown != NULL, "sample text");
    for (char *c = shown; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = *c == '\n' ? '/' : '?';
    mt_info("sample (step %d): %s >>>%s", step, prompt, shown);
    free(shown);
    if (!m || !m->file) {
        free(text);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "step", step);
    cJSON_AddStringToObject(o, "sample_prompt", prompt);
    cJSON_AddStringToObject(o, "sample", text);
    char *line = cJSON_PrintUnformatted(o);
    fprintf(m->file, "%s\n", line);
    fflush(m->file);
    free(line);
    cJSON_Delete(o);
    free(text);
}
