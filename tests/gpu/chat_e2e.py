#!/usr/bin/env python3
"""End to end on the GPU: a Qwen2-shaped model (random weights, the qwen2
fixture's tokenizer and Qwen2-Instruct's chat template) fine-tuned with LoRA
on a chat JSONL through `memtune tokenize --format chat` and `memtune train`,
answer-only loss. Checks, against transformers:

1. the file: for every conversation, the window holds apply_chat_template's
   ids, and the mask trains exactly the answers and the <|im_end|> closing
   each (a token is trained when it starts inside one), padding untrained;
2. the loss: memtune's eval loss (after one step at a learning rate of 1e-12,
   so the weights are the initial ones) equals transformers' fp32 mean cross
   entropy over the trained targets of the same eval windows, token-weighted
   across them (rel 2e-3: memtune computes in bf16);
3. training: LoRA r=16 lowers the held-out answer-only loss below 0.8x its
   value at the initial weights.

  python3 tests/gpu/chat_e2e.py --out $OUT
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys

import h5py
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
MEMTUNE = os.path.join(BUILD, "memtune")
FIXTURE = os.path.join(ROOT, "tests", "tokenizer", "fixtures", "qwen2")
T = 128


def conversations(n, seed=5):
    rng = random.Random(seed)
    words = ("the of and to in is was that for on with as by he it at from his an were are which this be or has had "
             "not but what all when can there who said if no into more so do out up time about then them like").split()
    out = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "Answer exactly."})
        for _ in range(rng.randint(1, 2)):
            ws = [rng.choice(words) for _ in range(rng.randint(2, 6))]
            kind = rng.randint(0, 2)
            if kind == 0:
                q, a = "Repeat: " + " ".join(ws), " ".join(ws)
            elif kind == 1:
                q, a = "Reverse: " + " ".join(ws), " ".join(reversed(ws))
            else:
                k = rng.randint(2, 9)
                q, a = f"Count to {k}", " ".join(str(j) for j in range(1, k + 1))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def answer_mask(tok, conv, text, offsets):
    spans = []
    for k, m in enumerate(conv):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True))
            end = tok.apply_chat_template(conv[:k + 1], tokenize=False).index("<|im_end|>", start) + len("<|im_end|>")
            spans.append((start, end))
    return [1 if any(a <= o[0] < b for a, b in spans) else 0 for o in offsets]


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(res.stdout + res.stderr)
    print(res.stdout[-3000:] + res.stderr[-3000:], flush=True)
    if res.returncode:
        sys.exit(f"chat_e2e: {cmd[1]} failed (exit {res.returncode})")
    return res.stdout


def write_config(path, model, data, out, steps, lr, eval_every):
    with open(path, "w") as f:
        f.write(f"""model:
  path: {model}
data:
  train: {data}
  eval_fraction: 0.05
lora:
  r: 16
  alpha: 32
  dropout: 0
  targets: all-linear
train:
  steps: {steps}
  micro_batch: 8
  seq_len: {T}
  eval_every: {eval_every}
  eval_batches: 4
  log_every: 1
  device: gpu
optim:
  lr: {lr}
  warmup_steps: 0
output:
  dir: {out}
checkpoint:
  every: 0
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/memtune-gpu")
    ap.add_argument("--work", default="/tmp/mt-chat-e2e")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    results = {}
    # the model: Qwen2's shape, the fixture's tokenizer and chat template
    model_dir = os.path.join(args.work, "qwen2-chat")
    cfg = Qwen2Config(vocab_size=6144, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURE, name), model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = conversations(4000)
    data_jsonl = os.path.join(args.work, "chat.jsonl")
    with open(data_jsonl, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
    data = os.path.join(args.work, "chat.h5")
    line = run([MEMTUNE, "tokenize", "--tokenizer", model_dir, "--format", "chat", "--seq-len", str(T), "--input",
                data_jsonl, "--output", data], os.path.join(args.out, "chat_e2e-tokenize.log"))
    results["tokenize"] = line.strip()

    # 1. the file against apply_chat_template
    with h5py.File(data, "r") as f:
        tokens, mask, window = f["tokens"][:], f["loss_mask"][:], int(f.attrs["window"])
    assert window == T, window
    bad = 0
    for i, conv in enumerate(convs):
        text = tok.apply_chat_template(conv, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        assert len(ids) <= T, "a conversation longer than a window: shorten the generator"
        want = answer_mask(tok, conv, text, enc["offset_mapping"])
        want[0] = 0  # a window's first token is never a target
        w = slice(i * T, i * T + T)
        got_ids, got_mask = tokens[w][:len(ids)].tolist(), mask[w][:len(ids)].tolist()
        if got_ids != ids or got_mask != want or mask[w][len(ids):].any():
            bad += 1
            if bad <= 3:
                print(f"conversation {i}: ids equal {got_ids == ids}, masks equal {got_mask == want}")
    print(f"chat_e2e: {len(convs)} conversations: {len(convs) - bad} windows hold apply_chat_template's ids with "
          f"answer-only masks; {bad} differ")
    results["windows_differing"] = bad

    # 2. the loss at the initial weights, against transformers
    run1 = os.path.join(args.work, "run-initial")
    yaml1 = os.path.join(args.work, "initial.yaml")
    write_config(yaml1, model_dir, data, run1, 2, 1e-12, 1)
    run([MEMTUNE, "train", yaml1], os.path.join(args.out, "chat_e2e-initial.log"))
    evals = [json.loads(l)["eval_loss"] for l in open(os.path.join(run1, "metrics.jsonl")) if "eval_loss" in l]
    mt_eval = evals[0]
    total = (len(tokens) - 1) // T
    n_eval = max(1, int(total * 0.05))
    first = total - n_eval
    rows = list(range(first, first + min(4 * 8, n_eval)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).cuda().eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            x = torch.tensor(tokens[r * T:r * T + T].astype(np.int64), device="cuda")[None]
            y = torch.tensor(tokens[r * T + 1:r * T + T + 1].astype(np.int64), device="cuda")[None]
            m = torch.tensor(mask[r * T + 1:r * T + T + 1].astype(bool), device="cuda")[None]
            logits = model(x).logits.float()
            ce = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="none")
            nll += ce[m[0]].double().sum().item()
            count += int(m.sum().item())
    hf_eval = nll / count
    rel = abs(mt_eval - hf_eval) / hf_eval
    print(f"chat_e2e: eval loss over {count} trained targets of {len(rows)} windows: memtune {mt_eval:.6f}, "
          f"transformers fp32 {hf_eval:.6f} (rel {rel:.2e})")
    results.update(eval_memtune=mt_eval, eval_transformers=hf_eval, eval_rel=rel, eval_targets=count)

    # 3. LoRA learns the answers
    run2 = os.path.join(args.work, "run-lora")
    yaml2 = os.path.join(args.work, "lora.yaml")
    write_config(yaml2, model_dir, data, run2, 150, 3e-3, 50)
    run([MEMTUNE, "train", yaml2], os.path.join(args.out, "chat_e2e-train.log"))
    losses = [json.loads(l) for l in open(os.path.join(run2, "metrics.jsonl"))]
    first_loss, last_loss = losses[0]["loss"], losses[-1]["loss"]
    last_eval = [r["eval_loss"] for r in losses if "eval_loss" in r][-1]
    print(f"chat_e2e: LoRA r=16, 150 steps: train loss {first_loss:.4f} -> {last_loss:.4f}, eval {last_eval:.4f}")
    results.update(first_loss=first_loss, last_loss=last_loss, last_eval=last_eval)
    # the held-out answers' loss after training against the same windows'
    # loss at the initial weights (step-to-step train losses move by +-1 on
    # this data, so one step's value is no measure)
    ok = bad == 0 and rel < 2e-3 and last_eval < 0.8 * mt_eval
    results["passed"] = ok
    with open(os.path.join(args.out, "chat_e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("chat_e2e: " + ("passed" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
