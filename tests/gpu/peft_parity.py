#!/usr/bin/env python3
"""memtune's LoRA against Hugging Face PEFT, and its NF4 against bitsandbytes,
on the GPU machine.

1. A Llama (GQA, 4 layers; --family qwen3: a Qwen3 with head norms and its
   own head_dim; --family gemma3: a Gemma 3 with sliding and global layers;
   --family phi3: a Phi-3, its fused qkv_proj and gate_up_proj adapted whole)
   is built and saved by transformers; PEFT puts a
   LoRA adapter (r=16, all seven linear modules) on it, makes lora_B
   non-zero (as after training) and saves the adapter. memtune
   (tests/gpu/parity_tool.c) loads the base and PEFT's adapter and computes
   loss, logits and every adapter gradient, on the GPU (bf16) and the CPU
   (fp32); PEFT computes them in fp32 (the truth) and in bf16. Per-tensor
   cosine similarity and max relative error are reported.
2. memtune trains an adapter on the GPU and saves it; PEFT loads it onto the
   base and its logits are compared with memtune's for that adapter.
3. With bitsandbytes: memtune's NF4 codes, absmax codes, scales and
   dequantized weights against bitsandbytes' quantize_4bit (nf4, blocksize
   64, double quantization), and memtune's QLoRA loss against PEFT +
   bitsandbytes on the same base and adapter.
Prints tables, writes peft_parity.json; exits 1 on a failure.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_common import (MEMTUNE, PARITY, Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config,  # noqa: E402
                            Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, compare_grads, log, memtune_parity, rel,
                            write_dataset)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, SHAPE),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config,
              dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig,
               dict(vocab_size=32000, hidden_size=1152, intermediate_size=6912, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                    sliding_window=64, sliding_window_pattern=2,
                    layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=4096,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "phi3": (Phi3ForCausalLM, Phi3Config,  # fused qkv_proj and gate_up_proj: PEFT adapts them whole
             dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_theta=10000.0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0,
                  tie_word_embeddings=False)),
}
FAMILY_MODULES = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
CLS, CFG = LlamaForCausalLM, LlamaConfig
B, T = 2, 128


def kind_of(name):
    parts = name.split(".")
    return ".".join(parts[parts.index("layers") + 2:])  # self_attn.q_proj.lora_A.weight


def peft_run(model, ids, dtype):
    """logits, mean loss and adapter gradients (PEFT names without .default) from PEFT."""
    model = model.to("cuda", dtype)
    model.eval()  # dropout off; gradients still flow
    model.zero_grad(set_to_none=True)
    inp = torch.from_numpy(ids[:, :-1].astype(np.int64)).cuda()
    tgt = torch.from_numpy(ids[:, 1:].astype(np.int64)).cuda()
    logits = model(input_ids=inp).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.float().cpu().numpy() for n, p in model.named_parameters()
             if p.requires_grad}
    out = logits.detach().reshape(-1, logits.shape[-1]).cpu().numpy(), float(loss), grads
    model.zero_grad(set_to_none=True)
    return out


def memtune_run(base, adapter, tokens, device, out, grads=True, quantize=False):
    extra = ["--adapter", adapter] + (["--grads"] if grads else []) + (["--quantize", "nf4"] if quantize else [])
    return memtune_parity(base, tokens, B, T, device, out, extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-peft-parity"))
    ap.add_argument("--work", default="/tmp/mt-peft-work")
    ap.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    args = ap.parse_args()
    global CLS, CFG, SHAPE, MODULES
    CLS, CFG, SHAPE = FAMILIES[args.family]
    MODULES = FAMILY_MODULES.get(args.family, MODULES)
    suffix = "" if args.family == "llama" else f"-{args.family}"
    args.work += suffix
    if CLS is None:
        log(f"transformers has no {args.family} model class: nothing checked")
        return 1
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    from peft import LoraConfig, PeftModel, get_peft_model
    import peft
    log(f"peft {peft.__version__}")
    report, failures = {}, []

    # ---- 1. PEFT's adapter in memtune
    base = os.path.join(args.work, "base")
    torch.manual_seed(1234)
    model = CLS(CFG(**SHAPE)).float()
    model.save_pretrained(base)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=MODULES, task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    adapter = os.path.join(args.work, "peft-adapter")
    pm.save_pretrained(adapter)
    log(f"PEFT saved {sorted(os.listdir(adapter))}")
    ids = np.random.default_rng(7).integers(0, SHAPE["vocab_size"], size=(B, T + 1), dtype=np.int32)
    tokens = os.path.join(args.work, "tokens")
    ids.tofile(tokens)
    p32 = peft_run(pm, ids, torch.float32)
    p16 = peft_run(pm, ids, torch.bfloat16)
    pm.to("cpu", torch.float32)
    mg = memtune_run(base, adapter, tokens, "gpu", os.path.join(args.work, "gpu.st"))
    mc = memtune_run(base, adapter, tokens, "cpu", os.path.join(args.work, "cpu.st"))
    r = {"loss": {"peft_fp32": p32[1], "peft_bf16": p16[1], "memtune_gpu_bf16": mg[1], "memtune_cpu_fp32": mc[1]},
         "loss_rel_error": {"memtune_cpu_fp32_vs_peft_fp32": abs(mc[1] - p32[1]) / p32[1],
                            "memtune_gpu_bf16_vs_peft_fp32": abs(mg[1] - p32[1]) / p32[1],
                            "peft_bf16_vs_peft_fp32": abs(p16[1] - p32[1]) / p32[1]},
         "logits_rel_error": {"memtune_cpu_fp32_vs_peft_fp32": rel(mc[0], p32[0]),
                              "memtune_gpu_bf16_vs_peft_fp32": rel(mg[0], p32[0]),
                              "peft_bf16_vs_peft_fp32": rel(p16[0], p32[0])},
         "adapter_tensors": len(p32[2]),
         "grads_memtune_gpu_bf16_vs_peft_fp32": compare_grads(mg[2], p32[2], p32[2], kind_of),
         "grads_memtune_cpu_fp32_vs_peft_fp32": compare_grads(mc[2], p32[2], p32[2], kind_of),
         "grads_peft_bf16_vs_peft_fp32": compare_grads(p16[2], p32[2], p32[2], kind_of)}
    report["peft_adapter_in_memtune"] = r
    le = r["loss_rel_error"]
    log(f"== PEFT's adapter in memtune ({len(p32[2])} adapter tensors, {SHAPE['num_hidden_layers']} layers)")
    log(f"  loss: peft fp32 {p32[1]:.6f} | memtune cpu fp32 {mc[1]:.6f} (rel {le['memtune_cpu_fp32_vs_peft_fp32']:.2e})"
        f" | memtune gpu bf16 {mg[1]:.6f} (rel {le['memtune_gpu_bf16_vs_peft_fp32']:.2e}) | peft bf16 {p16[1]:.6f}"
        f" (rel {le['peft_bf16_vs_peft_fp32']:.2e})")
    log("  logits rel error: " + ", ".join(f"{k} {v:.2e}" for k, v in r["logits_rel_error"].items()))
    log(f"  {'adapter gradient':30s} {'n':>3s} {'memtune gpu cos':>16s} {'max rel':>9s} {'memtune cpu cos':>16s}"
        f" {'max rel':>9s} {'peft bf16 cos':>14s} {'max rel':>9s}")
    for k, s in r["grads_memtune_gpu_bf16_vs_peft_fp32"].items():
        c = r["grads_memtune_cpu_fp32_vs_peft_fp32"][k]
        h = r["grads_peft_bf16_vs_peft_fp32"][k]
        log(f"  {k:30s} {s['tensors']:3d} {s['min_cos']:16.5f} {s['max_maxrel']:9.2e} {c['min_cos']:16.7f}"
            f" {c['max_maxrel']:9.2e} {h['min_cos']:14.5f} {h['max_maxrel']:9.2e}")
    if len(mg[2]) != len(p32[2]):
        failures.append(f"memtune has {len(mg[2])} adapter gradients, PEFT {len(p32[2])}")
    if le["memtune_cpu_fp32_vs_peft_fp32"] >= 1e-4:
        failures.append("cpu fp32 loss differs from PEFT fp32")
    if le["memtune_gpu_bf16_vs_peft_fp32"] >= 1e-2:
        failures.append("gpu bf16 loss differs from PEFT fp32")
    if min(s["min_cos"] for s in r["grads_memtune_cpu_fp32_vs_peft_fp32"].values()) < 0.99999:
        failures.append("cpu fp32 adapter gradients differ from PEFT fp32")
    if min(s["min_cos"] for s in r["grads_memtune_gpu_bf16_vs_peft_fp32"].values()) < 0.99:
        failures.append("gpu bf16 adapter gradient cosine < 0.99")

    # ---- 2. memtune's adapter in PEFT
    log("== an adapter trained and saved by memtune, loaded by PEFT")
    data = os.path.join(args.work, "random.h5")
    write_dataset(data, np.random.default_rng(3).integers(0, SHAPE["vocab_size"], 300000), SHAPE["vocab_size"])
    run = os.path.join(args.work, "run")
    subprocess.run([MEMTUNE, "train", os.path.join(ROOT, "configs", "llama-lora.yaml"),
                    "--set", f"model.path={base}", "--set", f"data.train={data}", "--set", f"output.dir={run}",
                    "--set", "train.steps=20", "--set", "optim.warmup_steps=2", "--set", "train.seq_len=128",
                    "--set", "train.micro_batch=4",
                    "--set", "train.device=gpu", "--set", "optim.lr=1e-3", "--set", "train.eval_batches=0",
                    "--set", "train.log_every=5"], check=True)
    saved = os.path.join(run, "adapter")
    model = CLS.from_pretrained(base, torch_dtype=torch.float32)
    pm2 = PeftModel.from_pretrained(model, saved, is_trainable=True)
    q32 = peft_run(pm2, ids, torch.float32)
    q16 = peft_run(pm2, ids, torch.bfloat16)
    pm2.to("cpu")
    nc = memtune_run(base, saved, tokens, "cpu", os.path.join(args.work, "saved.cpu.st"), grads=False)
    ng = memtune_run(base, saved, tokens, "gpu", os.path.join(args.work, "saved.gpu.st"), grads=False)
    r2 = {"logits_rel_error_memtune_cpu_vs_peft_fp32": rel(nc[0], q32[0]),
          "logits_rel_error_memtune_gpu_vs_peft_bf16": rel(ng[0], q16[0]),
          "loss_peft_fp32": q32[1], "loss_memtune_cpu": nc[1], "loss_memtune_gpu": ng[1]}
    report["memtune_adapter_in_peft"] = r2
    log(f"  logits: memtune cpu vs PEFT fp32 rel {r2['logits_rel_error_memtune_cpu_vs_peft_fp32']:.2e}; "
        f"memtune gpu vs PEFT bf16 rel {r2['logits_rel_error_memtune_gpu_vs_peft_bf16']:.2e}; "
        f"loss PEFT {q32[1]:.6f} memtune cpu {nc[1]:.6f} gpu {ng[1]:.6f}")
    if r2["logits_rel_error_memtune_cpu_vs_peft_fp32"] >= 1e-4:
        failures.append("memtune's saved adapter: PEFT's logits differ from memtune cpu")
    if r2["logits_rel_error_memtune_gpu_vs_peft_bf16"] >= 2e-2:
        failures.append("memtune's saved adapter: PEFT bf16 logits differ from memtune gpu")

    # ---- 3. NF4 against bitsandbytes
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as e:  # noqa: BLE001 - report why, do not fail
        log(f"== bitsandbytes not importable ({e}); NF4 comparison skipped")
        report["bitsandbytes"] = f"skipped: {e}"
    else:
        log(f"== NF4 against bitsandbytes {bnb.__version__}")
        report["bitsandbytes"] = nf4_vs_bnb(args.work, bf, failures)
        try:
            q = report["qlora_vs_peft_bnb"] = qlora_vs_bnb(base, adapter, ids, tokens, args.work, p32[1])
            if q["logits_rel_error_vs_truth"]["memtune_cpu_fp32"] >= 2e-3:
                failures.append("QLoRA: memtune cpu logits differ from the dequantized fp32 truth")
            if q["logits_rel_error_vs_truth"]["memtune_gpu_bf16"] >= 3e-2:
                failures.append("QLoRA: memtune gpu logits differ from the dequantized fp32 truth")
        except Exception as e:  # noqa: BLE001
            log(f"  QLoRA with PEFT + bitsandbytes failed: {e}")
            report["qlora_vs_peft_bnb"] = f"failed: {e}"

    with open(os.path.join(args.out, f"peft_parity{suffix}.json"), "w") as f:
        json.dump(report, f, indent=1)
    log("FAILURES:\n  " + "\n  ".join(failures) if failures else "peft parity: all checks passed")
    return 1 if failures else 0


def nf4_vs_bnb(work, bf, failures):
    out = {}
    ours_map = None
    for name, w in (("normal 4096x1024", torch.randn(4096, 1024) * 0.02),
                    ("heavy-tailed 1000x333", torch.distributions.StudentT(3.0).sample((1000, 333)) * 0.05)):
        w = w.to(torch.bfloat16).float()  # bitsandbytes quantizes bf16 weights
        path = os.path.join(work, "nf4-in.st")
        save_file({"weight": w.numpy()}, path)
        dump = os.path.join(work, "nf4-out.st")
        subprocess.run([PARITY, "--nf4", path, "--out", dump], check=True)
        d = load_file(dump)
        ours_map = d["dynamic_map"]
        packed, state = bf.quantize_4bit(w.to(torch.bfloat16).cuda(), blocksize=64, quant_type="nf4",
                                         compress_statistics=True)
        codes = packed.view(torch.uint8).flatten().cpu().numpy()
        deq = bf.dequantize_4bit(packed, state).float().flatten().cpu().numpy()
        n = w.numel()
        ours = d["codes"].astype(np.uint8)
        absq = state.absmax.view(torch.uint8).flatten().cpu().numpy()
        r = {"values": n,
             "codes_equal_fraction": float(np.mean(ours == codes[:len(ours)])),
             "gpu_codes_equal_cpu": bool(np.array_equal(d["codes_gpu"].astype(np.uint8), ours)),
             "absmax_codes_equal_fraction": float(np.mean(d["absmax_q"].astype(np.uint8) == absq)),
             "absmax2_max_rel_diff": float(np.max(np.abs(d["absmax2"] - state.state2.absmax.cpu().numpy()) /
                                                  np.abs(state.state2.absmax.cpu().numpy()))),
             "offset": [float(d["offset"][0]), float(state.offset)],
             "dequantized_max_abs_diff": float(np.max(np.abs(d["dequantized"] - deq))),
             "dequantized_rel_error_vs_weight": rel(d["dequantized"], w.flatten().numpy()),
             "bnb_dequantized_rel_error_vs_weight": rel(deq, w.flatten().numpy())}
        out[name] = r
        log(f"  {name}: codes equal {r['codes_equal_fraction']:.6f}, absmax codes equal "
            f"{r['absmax_codes_equal_fraction']:.6f}, group scales max rel diff {r['absmax2_max_rel_diff']:.1e}, "
            f"offset {r['offset'][0]:.8g} vs {r['offset'][1]:.8g}, dequantized max |diff| "
            f"{r['dequantized_max_abs_diff']:.2e}; error vs weights memtune {r['dequantized_rel_error_vs_weight']:.4f}"
            f" bnb {r['bnb_dequantized_rel_error_vs_weight']:.4f}; GPU codes == CPU codes: {r['gpu_codes_equal_cpu']}")
        if not r["gpu_codes_equal_cpu"]:
            failures.append(f"NF4 {name}: GPU codes differ from the CPU reference")
        if r["codes_equal_fraction"] < 0.999:
            failures.append(f"NF4 {name}: only {r['codes_equal_fraction']:.4f} of codes equal bitsandbytes'")
    bmap = bf.create_dynamic_map(signed=True).cpu().numpy()
    out["dynamic_map_equal"] = bool(np.array_equal(bmap.astype(np.float32), ours_map))
    out["dynamic_map_max_abs_diff"] = float(np.max(np.abs(bmap - ours_map)))
    log(f"  dynamic 8-bit map equal to bitsandbytes': {out['dynamic_map_equal']} (max |diff| "
        f"{out['dynamic_map_max_abs_diff']:.1e})")
    return out


def qlora_vs_bnb(base, adapter, ids, tokens, work, lora_loss_fp32):
    """QLoRA three ways on one base and adapter: the truth (fp32 model whose
    linear weights are bitsandbytes' dequantized NF4 values, PEFT in fp32),
    PEFT + bitsandbytes (bf16 compute), memtune QLoRA on the GPU (bf16)."""
    import bitsandbytes.functional as bf
    from peft import PeftModel
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    # fp32 weights in, as memtune reads this fp32 folder: both quantize the same values
    # (loaded as bf16, bitsandbytes would quantize bf16-rounded weights, and codes
    # near a midpoint would land on the other side)
    model = CLS.from_pretrained(base, quantization_config=q, torch_dtype=torch.float32,
                                             device_map={"": 0})
    pm = PeftModel.from_pretrained(model, adapter)
    pm.eval()
    inp = torch.from_numpy(ids[:, :-1].astype(np.int64)).cuda()
    tgt = torch.from_numpy(ids[:, 1:].astype(np.int64)).cuda()

    def run(m):
        with torch.no_grad():
            z = m(input_ids=inp).logits.float()
        return z.reshape(-1, z.shape[-1]).cpu().numpy(), float(F.cross_entropy(torch.from_numpy(
            z.reshape(-1, z.shape[-1]).cpu().numpy()), tgt.reshape(-1).cpu()))

    bnb_logits, bnb_loss = run(pm)
    # the truth: dequantized NF4 weights in an fp32 model
    deq = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "weight") and hasattr(mod.weight, "quant_state"):
            deq[name.replace(".base_layer", "") + ".weight"] = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().cpu()
    del pm, model
    torch.cuda.empty_cache()
    truth_model = CLS.from_pretrained(base, torch_dtype=torch.float32)
    sd = truth_model.state_dict()
    with torch.no_grad():
        for k, v in deq.items():
            sd[k].copy_(v.reshape(sd[k].shape))
    truth = PeftModel.from_pretrained(truth_model, adapter).cuda().eval()
    truth_logits, truth_loss = run(truth)
    mq = memtune_run(base, adapter, tokens, "gpu", os.path.join(work, "qlora.gpu.st"), grads=False, quantize=True)
    mqc = memtune_run(base, adapter, tokens, "cpu", os.path.join(work, "qlora.cpu.st"), grads=False, quantize=True)
    r = {"dequantized_tensors": len(deq), "loss_truth_fp32": truth_loss, "loss_peft_bnb_bf16": bnb_loss,
         "loss_memtune_qlora_gpu_bf16": mq[1], "loss_memtune_qlora_cpu_fp32": mqc[1],
         "logits_rel_error_vs_truth": {"memtune_cpu_fp32": rel(mqc[0], truth_logits),
                                       "memtune_gpu_bf16": rel(mq[0], truth_logits),
                                       "peft_bnb_bf16": rel(bnb_logits, truth_logits)},
         "logits_rel_diff_memtune_gpu_vs_peft_bnb": rel(mq[0], bnb_logits),
         "loss_unquantized_lora_fp32": lora_loss_fp32}
    e = r["logits_rel_error_vs_truth"]
    log(f"  QLoRA ({len(deq)} NF4 weights): loss truth fp32 {truth_loss:.6f}, memtune cpu fp32 {mqc[1]:.6f}, "
        f"memtune gpu {mq[1]:.6f}, PEFT + bitsandbytes {bnb_loss:.6f}; logits rel error vs truth: memtune cpu "
        f"{e['memtune_cpu_fp32']:.2e}, memtune gpu {e['memtune_gpu_bf16']:.2e}, PEFT + bitsandbytes "
        f"{e['peft_bnb_bf16']:.2e}")
    return r


if __name__ == "__main__":
    sys.exit(main())
