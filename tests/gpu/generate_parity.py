#!/usr/bin/env python3
"""memtune generate against transformers' generate, greedy, fp32 on the CPU,
64 new tokens, on three random-weight shapes with the fixtures' tokenizers:
a TinyLlama-like Llama (llama2 fixture), Qwen2 with tied embeddings and odd
head counts (qwen2 fixture), a Llama-3 shape with llama3 rope scaling
(llama3 fixture). Both start from the same ids (BOS, when the tokenizer has
one, then the prompt's); the texts must be equal (memtune --device cpu).
Where a GPU is present, memtune --device gpu (bf16) runs the same prompts
and the first token where its text leaves the fp32 one is reported.

  python3 tests/gpu/generate_parity.py --out $OUT
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
MEMTUNE = os.path.join(BUILD, "memtune")
FIXTURES = os.path.join(ROOT, "tests", "tokenizer", "fixtures")
SHAPES = {
    "tinyllama-like": ("llama2", LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                             max_position_embeddings=512, rms_norm_eps=1e-5)),
    "qwen2-tied-odd": ("qwen2", Qwen2Config(vocab_size=6144, hidden_size=240, intermediate_size=640,
                                            num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                                            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
                                            tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama3", LlamaConfig(vocab_size=6144, hidden_size=256, intermediate_size=704,
                                                  num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                                  max_position_embeddings=1024, rms_norm_eps=1e-5,
                                                  rope_theta=500000.0,
                                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 128})),
}
# 7 prompts on each of the three shapes: 21, over the 20 issue 24 asks for
PROMPTS = ["In the beginning", "The quick brown fox", "1, 2, 3,", "def main():", "Hello, world",
           "Once upon a time", "Q: What is the capital of France?\nA:"]


def memtune(folder, prompt, device):
    res = subprocess.run([MEMTUNE, "generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", "64",
                          "--device", device], capture_output=True, text=True)
    text = res.stdout[:-1] if res.stdout.endswith("\n") else res.stdout
    return text, (res.stderr[-400:] if res.returncode else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/memtune-gpu"))
    ap.add_argument("--work", default="/tmp/mt-generate-parity")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    torch.manual_seed(0)
    results, bad, divergences = {}, 0, []
    for name, (fixture, cfg) in SHAPES.items():
        folder = os.path.join(args.work, name)
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
        model.save_pretrained(folder)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(FIXTURES, fixture, f), folder)
        tok = AutoTokenizer.from_pretrained(folder)
        for prompt in PROMPTS:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
                tok(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, num_beams=1,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
            new = out[0, len(ids):].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            want = tok.decode(new, skip_special_tokens=True)
            got, err = memtune(folder, prompt, "cpu")
            same = err is None and got == want
            bad += not same
            row = {"equal": same, "transformers": want, "memtune": got, "error": err}
            note = ""
            if torch.cuda.is_available():
                # bf16 on the GPU: where its greedy text first leaves the fp32 one (in the tokenizer's ids)
                gpu_text, gpu_err = memtune(folder, prompt, "gpu")
                a, b = tok(want, add_special_tokens=False)["input_ids"], tok(gpu_text or "", add_special_tokens=False)["input_ids"]
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                row.update(gpu_bf16=gpu_text, gpu_error=gpu_err, gpu_first_divergence=first, gpu_tokens=len(a))
                divergences.append(first)
                bad += gpu_err is not None
                note = f"; GPU bf16 first differs at token {first} of {len(a)}"
            results[f"{name}: {prompt}"] = row
            print(f"{name} | {prompt!r}: {'equal' if same else 'DIFFERENT'} ({len(new)} tokens){note}", flush=True)
    with open(os.path.join(args.out, "generate_parity.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"generate_parity: {len(results) - bad} of {len(results)} equal (fp32, CPU)")
    if divergences:
        print(f"generate_parity: memtune on the GPU (bf16) first leaves the fp32 greedy text at token "
              f"{sum(divergences) / len(divergences):.1f} on average over {len(divergences)} prompts")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
