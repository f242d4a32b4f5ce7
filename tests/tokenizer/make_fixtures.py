#!/usr/bin/env python3
"""Makes the tokenizer fixtures of tests/test_tokenizer.c and the corpus of
tests/tokenizer/compare.py, with Hugging Face `tokenizers` (PyPI, the
reference): small BPE tokenizers trained on mixed text with the
pre-tokenizer, normaliser, decoder and special-token settings of released
models, since their own tokenizer.json files are not in this repository:

  llama3   byte-level BPE, Llama-3's split regex, ignore_merges, <|begin_of_text|> ...
  qwen2    byte-level BPE, NFC, Qwen2's split regex (single digits), ChatML tokens
  gpt2     byte-level BPE with its own regex (ByteLevel use_regex), add_prefix_space off
  llama2   SentencePiece-style BPE (TinyLlama, Llama-2 conversions): Prepend + Replace
           normalisers, byte fallback, <s> </s> <unk>
  mistral  SentencePiece-style BPE as newer conversions write it: Metaspace
           pre-tokenizer (prepend first, no split), byte fallback

Each goes to tests/tokenizer/fixtures/NAME/tokenizer.json with a
tokenizer_config.json (bos/eos, and with --chat the released chat template of
the family). `--chat` also writes what transformers' apply_chat_template gives
for tests/tokenizer/chat.jsonl (chat-CHOICE.expected: ids and answer masks).
`--corpus FILE --mb N` also writes N MB of mixed text (KJV, source code,
numbers, CJK, emoji, combining marks, whitespace runs, invalid UTF-8) for
compare.py. `--expect` writes, per fixture, the ids HF gives for
tests/tokenizer/sample.txt (expected.NAME.ids), which the C test checks with
no Python. Run from the repository root."""
import argparse
import json
import os
import random
import subprocess

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def kjv_text():
    try:
        return subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        with open(os.path.join(HERE, "..", "..", "data", "kjv.txt"), encoding="utf-8") as f:
            return f.read()


def source_text():
    out = []
    root = os.path.join(HERE, "..", "..")
    for folder in ("kernels", "trainer", "datasets", "bench"):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith((".c", ".h", ".cu", ".py", ".cpp")):
                with open(os.path.join(root, folder, name), encoding="utf-8") as f:
                    out.append(f.read())
    return "\n".join(out)


def mixed_pieces(rng):
    """Short pieces of the kinds a tokenizer gets wrong first."""
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 40)))
    kana = "".join(chr(rng.randint(0x3041, 0x3096)) for _ in range(rng.randint(1, 12)))
    emoji = "".join(rng.choice(["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "🔥", "✨", "🙂"]) for _ in range(rng.randint(1, 6)))
    combining = "".join(rng.choice("aeiouAEIOU") + rng.choice(["\u0301", "\u0308", "\u0327", "\u0303\u0323"])
                        for _ in range(rng.randint(1, 8)))
    number = rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 12))), f"{rng.random() * 1e4:.4f}",
                         f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1900, 2100)}",
                         f"-{rng.randint(1, 99999)}e{rng.randint(-9, 9)}"])
    spaces = rng.choice(["  ", "   ", "\t", "\n\n", " \n ", "\r\n", "\n\n\n   ", "    \t  ", "\u00a0", "\u3000"])
    words = rng.choice(["Hello, world!", "it's", "I'LL", "don't", "naïve café", "Ünïcödé", "Ελληνικά",
                        "русский текст", "עברית", "العربية", "हिन्दी", "<s>", "</s>", "<|im_start|>",
                        "<|begin_of_text|>", "▁", "  leading", "trailing  ", "x" * rng.randint(50, 300)])
    return [cjk, kana, emoji, combining, number, spaces, words]


def mixed_text(size, seed=1):
    rng = random.Random(seed)
    kjv, code = kjv_text(), source_text()
    parts, total = [], 0
    while total < size:
        kind = rng.random()
        if kind < 0.45:
            start = rng.randint(0, len(kjv) - 4000)
            piece = kjv[start:start + rng.randint(200, 4000)]
        elif kind < 0.75:
            start = rng.randint(0, len(code) - 4000)
            piece = code[start:start + rng.randint(200, 4000)]
        else:
            piece = "".join(rng.sample(mixed_pieces(rng), 7))
        parts.append(piece)
        total += len(piece.encode("utf-8"))
    return "".join(parts)


def train(name, out_dir, text):
    trainer_args = dict(vocab_size=6000, min_frequency=2, show_progress=False)
    if name in ("llama3", "qwen2", "gpt2"):
        tok = Tokenizer(models.BPE(ignore_merges=name == "llama3"))
        if name == "qwen2":
            tok.normalizer = normalizers.NFC()
        if name == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            split = LLAMA3_SPLIT if name == "llama3" else QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"],
                    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    "gpt2": ["<|endoftext|>"]}[name]
        tr = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
                                 **trainer_args)
        tok.train_from_iterator(text.splitlines(keepends=True), tr)
        cfg = {"llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
               "qwen2": {"bos_token": None, "eos_token": "<|endoftext|>"},
               "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}}[name]
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        if name == "llama2":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                             decoders.ByteFallback(), decoders.Fuse()])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        # rare characters fall back to their bytes, as in SentencePiece models
        tr = trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, limit_alphabet=250,
                                 vocab_size=8000, min_frequency=2, show_progress=False)
        # no pre-tokenizer splits the text: train on lines, not one 3 MB word
        tok.train_from_iterator(text.splitlines(), tr)
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        # <unk>, <s>, </s> are special and not normalised, as in the released files
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    os.makedirs(out_dir, exist_ok=True)
    if name in ("llama2", "mistral"):
        # the byte tokens are ordinary vocabulary in the released files, not added tokens
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return tok


NAMES = ["llama3", "qwen2", "gpt2", "llama2", "mistral"]

# The chat templates of released models' tokenizer_config.json files (Jinja
# source, as data: memtune renders them in C and must give the same ids):
# Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct, Llama-2-7b-chat-hf,
# Mixtral-8x7B-Instruct-v0.1 (as Mistral-7B-Instruct-v0.2), Mistral-7B-Instruct-v0.1,
# and plain ChatML (OpenHermes-2.5).
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                   "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                   "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                   "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
                   "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                   "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                   "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
                    "are supported!') }}{% endif %}{% endfor %}")
MISTRAL_V01_TEMPLATE = MISTRAL_TEMPLATE.replace("eos_token}}", "eos_token + ' ' }}")
FIXTURE_TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "qwen2": QWEN2_TEMPLATE, "llama2": LLAMA2_TEMPLATE,
                     "mistral": MISTRAL_TEMPLATE}
# (fixture, memtune's --chat-template, the template transformers renders)
CHAT_CASES = [("llama3", "auto", LLAMA3_TEMPLATE), ("qwen2", "auto", QWEN2_TEMPLATE),
              ("qwen2", "chatml", CHATML_TEMPLATE), ("llama2", "auto", LLAMA2_TEMPLATE),
              ("mistral", "auto", MISTRAL_TEMPLATE), ("mistral", "mistral-v0.1", MISTRAL_V01_TEMPLATE)]
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}


def chat_expect(fixtures, cases=None):
    """Per CHAT_CASES entry, fixtures/NAME/chat-CHOICE.expected: for each
    conversation of chat.jsonl, transformers' apply_chat_template ids and the
    answer mask (a token is trained when it starts inside an answer: from
    after the assistant header to the end-of-turn token that closes it,
    included), or "refused" where the template raises."""
    from transformers import AutoTokenizer
    with open(os.path.join(HERE, "chat.jsonl"), encoding="utf-8") as f:
        convs = []
        for line in f:
            obj = json.loads(line)
            if "messages" in obj:
                convs.append(obj["messages"])
            else:
                role = {"human": "user", "gpt": "assistant", "system": "system"}
                convs.append([{"role": role[m["from"]], "content": m["value"]} for m in obj["conversations"]])
    for name, choice, template in cases or CHAT_CASES:
        tok = AutoTokenizer.from_pretrained(os.path.join(fixtures, name))
        eot = END_OF_TURN.get(name, tok.eos_token)
        gen_header = name in ("llama3", "qwen2")
        lines = []
        for conv in convs:
            def render(msgs, gen=False):
                return tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                               add_generation_prompt=gen)
            try:
                text = render(conv)
            except Exception:  # jinja2's TemplateError from raise_exception
                lines.append("refused")
                continue
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = tok.apply_chat_template(conv, chat_template=template, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            assert list(ids) == enc["input_ids"], (name, conv)
            spans = []
            for k, m in enumerate(conv):
                if m["role"] != "assistant":
                    continue
                if k:
                    start = len(render(conv[:k], gen=gen_header))
                else:  # an assistant first: after its header
                    header = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                              "qwen2": "<|im_start|>assistant\n"}[name]
                    start = text.index(header) + len(header)
                end = render(conv[:k + 1]).index(eot, start) + len(eot)
                spans.append((start, end))
            mask = "".join("1" if any(a <= o[0] < b for a, b in spans) else "0" for o in enc["offset_mapping"])
            lines.append(" ".join(map(str, ids)) + "\t" + mask)
        path = os.path.join(fixtures, name, f"chat-{choice}.expected")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{path}: {len(lines)} conversations, {lines.count('refused')} refused")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", action="store_true", help="train the fixture tokenizers")
    ap.add_argument("--expect", action="store_true", help="write expected ids of sample.txt per fixture")
    ap.add_argument("--chat", action="store_true",
                    help="write the chat templates into the fixtures' tokenizer_config.json and the expected "
                         "renders of chat.jsonl (needs transformers)")
    ap.add_argument("--corpus", help="write this many --mb of mixed text here")
    ap.add_argument("--mb", type=float, default=10)
    args = ap.parse_args()
    fixtures = os.path.join(HERE, "fixtures")
    if args.fixtures:
        text = mixed_text(3_000_000, seed=7)
        for name in NAMES:
            train(name, os.path.join(fixtures, name), text)
            print(f"trained {name}")
    if args.expect:
        with open(os.path.join(HERE, "sample.txt"), "rb") as f:
            sample = f.read().decode("utf-8", errors="replace")
        for name in NAMES:
            tok = Tokenizer.from_file(os.path.join(fixtures, name, "tokenizer.json"))
            ids = tok.encode(sample, add_special_tokens=False).ids
            with open(os.path.join(fixtures, name, "expected.ids"), "w") as f:
                f.write(" ".join(map(str, ids)) + "\n")
            with open(os.path.join(fixtures, name, "expected.decoded"), "w", encoding="utf-8") as f:
                f.write(tok.decode(ids, skip_special_tokens=False))
            print(f"{name}: {len(ids)} ids")
    if args.chat:
        for name, template in FIXTURE_TEMPLATES.items():
            path = os.path.join(fixtures, name, "tokenizer_config.json")
            with open(path) as f:
                cfg = json.load(f)
            cfg["chat_template"] = template
            with open(path, "w") as f:
                json.dump(cfg, f, indent=1)
        chat_expect(fixtures)
    if args.corpus:
        data = mixed_text(int(args.mb * 1e6), seed=11).encode("utf-8")
        # invalid UTF-8 here and there: lone continuation bytes, truncated
        # sequences, overlong forms, surrogates, bytes above F4
        rng = random.Random(3)
        bad = [b"\x80", b"\xbf\xbf", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf5\x80",
               b"\xff", b"\xfe\xfe"]
        pieces, pos = [], 0
        while pos < len(data):
            step = rng.randint(2000, 20000)
            pieces.append(data[pos:pos + step])
            pieces.append(rng.choice(bad))
            pos += step
        with open(args.corpus, "wb") as f:
            f.write(b"".join(pieces))
        print(f"wrote {args.corpus}")


if __name__ == "__main__":
    main()
