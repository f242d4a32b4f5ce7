// datasets/chat.c: see chat.h. Each family's rendering follows the released
// models' templates (checked token for token against transformers'
// apply_chat_template by tests/tokenizer/make_fixtures.py's expectations).
#define _POSIX_C_SOURCE 200809L
#include "datasets/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const CHAT_NAMES = "llama3, llama2, mistral, mistral-v0.1, chatml, qwen2";

// ------------------------------------------------------------------ render

void mt_render_reset(mt_render *r) { r->len = 0, r->n = 0; }

void mt_render_add(mt_render *r, const char *s, size_t n, int trained) {
    if (n == 0) return;
    if (r->len + n + 1 > r->cap) {
        r->cap = 2 * (r->len + n + 1);
        r->text = realloc(r->text, r->cap);
        MT_CHECK(r->text != NULL, "chat render");
    }
    memcpy(r->text + r->len, s, n);
    r->len += n;
    r->text[r->len] = '\0';
    if (r->n > 0 && r->trained[r->n - 1] == (trained != 0)) {
        r->ends[r->n - 1] = r->len;
        return;
    }
    if (r->n == r->seg_cap) {
        r->seg_cap = r->seg_cap ? 2 * r->seg_cap : 16;
        r->ends = realloc(r->ends, (size_t)r->seg_cap * sizeof *r->ends);
        r->trained = realloc(r->trained, (size_t)r->seg_cap);
        MT_CHECK(r->ends && r->trained, "chat render segments");
    }
    r->ends[r->n] = r->len;
    r->trained[r->n++] = trained != 0;
}

static void add_str(mt_render *r, const char *s, int trained) { mt_render_add(r, s, strlen(s), trained); }

void mt_render_free(mt_render *r) {
    free(r->text), free(r->ends), free(r->trained);
    *r = (mt_render){0};
}

// The length of the code point at s (1 on invalid bytes) and its value.
static size_t utf8_next(const unsigned char *s, size_t n, unsigned *cp) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (k > n) k = 1;
    *cp = k == 1 ? c : c & (0x7f >> k);
    for (size_t i = 1; i < k; i++) *cp = (*cp << 6) | (s[i] & 0x3f);
    return k;
}

// Python's str.isspace(), which str.strip() and Jinja's trim remove.
static int py_space(unsigned c) {
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// content.strip(): the span without leading and trailing white space.
static void py_strip(const char **s, size_t *n) {
    const unsigned char *p = (const unsigned char *)*s;
    size_t len = *n, k;
    unsigned cp;
    while (len && (k = utf8_next(p, len, &cp)) && py_space(cp)) p += k, len -= k;
    while (len) {
        size_t start = len - 1;  // the start of the last code point
        while (start > 0 && (p[start] & 0xc0) == 0x80 && len - start < 4) start--;
        if (utf8_next(p + start, len - start, &cp) != len - start || !py_space(cp)) break;
        len = start;
    }
    *s = (const char *)p, *n = len;
}

static const char *role_name(mt_chat_role r) {
    return r == MT_ROLE_SYSTEM ? "system" : r == MT_ROLE_USER ? "user" : "assistant";
}

// Llama-2 and Mistral take user and assistant turns in turn, user first
// (Llama-2 after an optional leading system message).
static int check_alternation(const mt_chat_message *m, int n, int first, char *why, size_t why_len) {
    for (int i = first; i < n; i++)
        if ((m[i].role == MT_ROLE_USER) != ((i - first) % 2 == 0) || m[i].role == MT_ROLE_SYSTEM) {
            snprintf(why, why_len,
                     "message %d is a %s message; this template takes %suser and assistant messages in turn, "
                     "user first",
                     i + 1, role_name(m[i].role), first ? "one system message, then " : "");
            return -1;
        }
    return 0;
}

static void render_llama3(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r) {
    for (int i = 0; i < n; i++) {
        if (i == 0) add_str(r, t->bos, 0);
        add_str(r, "<|start_header_id|>", 0);
        add_str(r, role_name(m[i].role), 0);
        add_str(r, "<|end_header_id|>\n\n", 0);
        const char *s = m[i].content;
        size_t len = m[i].len;
        py_strip(&s, &len);
        int answer = m[i].role == MT_ROLE_ASSISTANT;
        mt_render_add(r, s, len, answer);
        add_str(r, "<|eot_id|>", answer);
    }
}

static void render_chatml(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r) {
    if (t->default_system[0] && (n == 0 || m[0].role != MT_ROLE_SYSTEM)) {
        add_str(r, "<|im_start|>system\n", 0);
        add_str(r, t->default_system, 0);
        add_str(r, "<|im_end|>\n", 0);
    }
    for (int i = 0; i < n; i++) {
        int answer = m[i].role == MT_ROLE_ASSISTANT;
        add_str(r, "<|im_start|>", 0);
        add_str(r, role_name(m[i].role), 0);
        add_str(r, "\n", 0);
        mt_render_add(r, m[i].content, m[i].len, answer);
        add_str(r, "<|im_end|>", answer);
        add_str(r, "\n", 0);
    }
}

static void render_llama2(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r) {
    int first = n > 0 && m[0].role == MT_ROLE_SYSTEM;
    for (int i = first; i < n; i++) {
        const char *s = m[i].content;
        size_t len = m[i].len;
        if (m[i].role == MT_ROLE_USER) {
            add_str(r, t->bos, 0);
            add_str(r, "[INST] ", 0);
            char *joined = NULL;
            if (i == 1 && first) {  // the system block leads the first user turn; .strip() takes both
                size_t sys = m[0].len;
                joined = malloc(sys + len + 32);
                MT_CHECK(joined != NULL, "chat render");
                size_t k = (size_t)sprintf(joined, "<<SYS>>\n");
                memcpy(joined + k, m[0].content, sys);
                k += sys;
                k += (size_t)sprintf(joined + k, "\n<</SYS>>\n\n");
                memcpy(joined + k, s, len);
                s = joined, len = k + len;
            }
            py_strip(&s, &len);
            mt_render_add(r, s, len, 0);
            free(joined);
            add_str(r, " [/INST]", 0);
        } else {
            py_strip(&s, &len);
            add_str(r, " ", 1);
            mt_render_add(r, s, len, 1);
            add_str(r, " ", 1);
            add_str(r, t->eos, 1);
        }
    }
}

static void render_mistral(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r) {
    add_str(r, t->bos, 0);
    for (int i = 0; i < n; i++) {
        if (m[i].role == MT_ROLE_USER) {
            add_str(r, "[INST] ", 0);
            mt_render_add(r, m[i].content, m[i].len, 0);
            add_str(r, " [/INST]", 0);
        } else {
            mt_render_add(r, m[i].content, m[i].len, 1);
            add_str(r, t->eos, 1);
            if (t->eos_space) add_str(r, " ", 0);
        }
    }
}

int mt_chat_render(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r, char *why,
                   size_t why_len) {
    mt_render_reset(r);
    switch (t->family) {
        case MT_CHAT_LLAMA3: render_llama3(t, m, n, r); break;
        case MT_CHAT_CHATML: render_chatml(t, m, n, r); break;
        case MT_CHAT_LLAMA2:
            if (check_alternation(m, n, n > 0 && m[0].role == MT_ROLE_SYSTEM, why, why_len)) return -1;
            render_llama2(t, m, n, r);
            break;
        case MT_CHAT_MISTRAL:
            if (n > 0 && m[0].role == MT_ROLE_SYSTEM) {
                snprintf(why, why_len, "%s's template takes no system message", t->name);
                return -1;
            }
            if (check_alternation(m, n, 0, why, why_len)) return -1;
            render_mistral(t, m, n, r);
            break;
    }
    return 0;
}

// ------------------------------------------------------------------ pick

// ChatML's default system prompt: a literal '<|im_start|>system\n...<|im_end|>'
// in the template (Qwen2's "You are a helpful assistant.", Qwen2.5's).
static void chatml_default_system(const char *jinja, char *out, size_t cap) {
    out[0] = '\0';
    for (const char *p = jinja; (p = strstr(p, "<|im_start|>system")) != NULL; p++) {
        const char *s = p + strlen("<|im_start|>system");
        if (!strncmp(s, "\\n", 2))
            s += 2;
        else if (*s == '\n')
            s++;
        else
            continue;
        const char *e = strstr(s, "<|im_end|>");
        if (!e || e == s || (size_t)(e - s) >= cap) continue;
        int literal = 1;
        for (const char *c = s; c < e; c++) literal &= *c != '\'' && *c != '"' && *c != '+' && *c != '{';
        if (!literal) continue;
        memcpy(out, s, (size_t)(e - s));
        out[e - s] = '\0';
        return;
    }
}

static int set_named(mt_chat_template *t, const char *name) {
    if (!strcmp(name, "llama3"))
        t->family = MT_CHAT_LLAMA3;
    else if (!strcmp(name, "llama2"))
        t->family = MT_CHAT_LLAMA2;
    else if (!strcmp(name, "mistral"))
        t->family = MT_CHAT_MISTRAL;
    else if (!strcmp(name, "mistral-v0.1"))
        t->family = MT_CHAT_MISTRAL, t->eos_space = 1;
    else if (!strcmp(name, "chatml"))
        t->family = MT_CHAT_CHATML;
    else if (!strcmp(name, "qwen2"))
        t->family = MT_CHAT_CHATML,
        snprintf(t->default_system, sizeof t->default_system, "You are a helpful assistant.");
    else
        return 0;
    snprintf(t->name, sizeof t->name, "%s", name);
    return 1;
}

// The family of a model's template, by its markers; "" with the reason
// when memtune does not render it.
static const char *recognise(const char *j, mt_chat_template *t, const char **reason) {
    *reason = NULL;
    if (strstr(j, "<|start_header_id|>") && strstr(j, "<|eot_id|>")) {
        if (strstr(j, "Cutting Knowledge Date") || strstr(j, "tools"))
            *reason = "a Llama-3.1-style template (a dated system prompt and tool calls)";
        return "llama3";
    }
    if (strstr(j, "<|im_start|>") && strstr(j, "<|im_end|>")) {
        if (strstr(j, "<think>") || strstr(j, "reasoning_content"))
            *reason = "a ChatML template with reasoning blocks (Qwen3-style <think>)";
        chatml_default_system(j, t->default_system, sizeof t->default_system);
        return "chatml";
    }
    if (strstr(j, "<<SYS>>") && strstr(j, "[INST]")) return "llama2";
    if (strstr(j, "[INST]")) {
        if (strstr(j, "[AVAILABLE_TOOLS]") || strstr(j, "[SYSTEM_PROMPT]"))
            *reason = "a Mistral template with tools or system prompts (v0.3 and later)";
        return strstr(j, "eos_token + ' '") ? "mistral-v0.1" : "mistral";
    }
    *reason = "none of the formats memtune renders";
    return "";
}

mt_err mt_chat_template_pick(mt_chat_template *out, const char *choice, const char *jinja, const char *bos,
                             const char *eos, const char *model) {
    memset(out, 0, sizeof *out);
    if (!strcmp(choice, "auto")) {
        if (!jinja)
            return mt_errorf(MT_ERR_USAGE,
                             "%s has no chat template (tokenizer_config.json's chat_template or chat_template.jinja); "
                             "name the format the model was trained with: --chat-template NAME (%s)",
                             model, CHAT_NAMES);
        const char *reason;
        const char *name = recognise(jinja, out, &reason);
        if (reason)
            return mt_errorf(MT_ERR_USAGE,
                             "%s's chat template is %s, which memtune does not render; name a format explicitly "
                             "with --chat-template NAME (%s) if the model follows one of them",
                             model, reason, CHAT_NAMES);
        char system[sizeof out->default_system];
        memcpy(system, out->default_system, sizeof system);
        set_named(out, name);
        memcpy(out->default_system, system, sizeof system);
    } else if (!set_named(out, choice)) {
        return mt_errorf(MT_ERR_USAGE, "--chat-template %s: expected auto or one of %s", choice, CHAT_NAMES);
    }
    int needs_bos = out->family == MT_CHAT_LLAMA3 || out->family == MT_CHAT_LLAMA2 || out->family == MT_CHAT_MISTRAL;
    int needs_eos = out->family == MT_CHAT_LLAMA2 || out->family == MT_CHAT_MISTRAL;
    if ((needs_bos && !bos) || (needs_eos && !eos))
        return mt_errorf(MT_ERR_USAGE,
                         "the %s chat format needs the tokenizer's %s token, and %s's tokenizer_config.json names "
                         "none (bos_token / eos_token)",
                         out->name, needs_bos && !bos ? "BOS" : "EOS", model);
    snprintf(out->bos, sizeof out->bos, "%s", bos ? bos : "");
    snprintf(out->eos, sizeof out->eos, "%s", eos ? eos : "");
    return MT_OK;
}

void mt_chat_add_generation_prompt(const mt_chat_template *t, mt_render *r) {
    if (t->family == MT_CHAT_LLAMA3) add_str(r, "<|start_header_id|>assistant<|end_header_id|>\n\n", 0);
    if (t->family == MT_CHAT_CHATML) add_str(r, "<|im_start|>assistant\n", 0);
}

const char *mt_chat_end_of_turn(const mt_chat_template *t) {
    return t->family == MT_CHAT_LLAMA3 ? "<|eot_id|>" : t->family == MT_CHAT_CHATML ? "<|im_end|>" : t->eos;
}
