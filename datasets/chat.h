// datasets/chat.h: chat templates. memtune renders the chat formats of the
// families it trains (Llama-3, Llama-2, Mistral instruct, ChatML as Qwen2 and
// Qwen2.5 use it) in C, recognising which one from the model's own Jinja
// chat_template by its markers, and refusing a template it does not know
// (the user names one with --chat-template; nothing is guessed). A render is
// the text transformers' apply_chat_template(messages, tokenize=False)
// produces, cut into segments that are trained (an assistant's answer and the
// end-of-turn token that closes it) or not (everything else).
#ifndef MT_CHAT_H
#define MT_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MT_CHAT_LLAMA3 = 1, MT_CHAT_LLAMA2, MT_CHAT_MISTRAL, MT_CHAT_CHATML } mt_chat_family;

typedef struct {
    mt_chat_family family;
    int eos_space;             // Mistral-7B-Instruct-v0.1: a space follows each answer's EOS
    char default_system[256];  // ChatML: the system prompt used when the chat has none ("": none)
    char bos[64], eos[64];     // the tokenizer's BOS and EOS as text
    char name[32];             // what it is, for logs: "llama3", "chatml", ...
} mt_chat_template;

// Picks the template. choice: "auto" (recognise `jinja`, the model's
// chat_template; NULL when the model has none) or a name: llama3, llama2,
// mistral, mistral-v0.1, chatml, qwen2 (ChatML with Qwen2's default system
// prompt). bos/eos: the tokenizer's token strings (NULL: none). `model`
// names the tokenizer folder in messages.
mt_err mt_chat_template_pick(mt_chat_template *out, const char *choice, const char *jinja, const char *bos,
                             const char *eos, const char *model);

typedef enum { MT_ROLE_SYSTEM, MT_ROLE_USER, MT_ROLE_ASSISTANT } mt_chat_role;

typedef struct {
    mt_chat_role role;
    const char *content;
    size_t len;
} mt_chat_message;

// A rendered text in segments: segment i is text[ends[i-1] .. ends[i]) and is
// trained when trained[i] is set.
typedef struct {
    char *text;
    size_t len, cap;
    size_t *ends;
    uint8_t *trained;
    int n, seg_cap;
} mt_render;
void mt_render_reset(mt_render *r);
// Appends s[0..n) to the render as trained or not (joining the last segment
// when it is the same kind).
void mt_render_add(mt_render *r, const char *s, size_t n, int trained);
void mt_render_free(mt_render *r);

// Renders a conversation (no generation prompt) into r (reset first). On a
// conversation the template cannot render (roles out of the order it
// requires, a system message where it takes none) returns nonzero with the
// reason in why.
int mt_chat_render(const mt_chat_template *t, const mt_chat_message *m, int n, mt_render *r, char *why, size_t why_len);

// Appends what add_generation_prompt=True adds: the assistant's header
// (Llama-3, ChatML; Llama-2 and Mistral add nothing).
void mt_chat_add_generation_prompt(const mt_chat_template *t, mt_render *r);
// The token that ends an answer: <|eot_id|>, <|im_end|>, or EOS.
const char *mt_chat_end_of_turn(const mt_chat_template *t);

#ifdef __cplusplus
}
#endif
#endif
