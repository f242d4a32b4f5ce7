"""What tests/gpu/hf_parity.py and tests/gpu/peft_parity.py share: error
measures, per-kind gradient summaries, a random-token HDF5 dataset, and the
model classes of the newer families (None where this transformers lacks
them)."""
import os
import subprocess
import time

import numpy as np
from safetensors.numpy import load_file

try:  # transformers 4.51 and later
    from transformers import Qwen3Config, Qwen3ForCausalLM
except ImportError:
    Qwen3Config = Qwen3ForCausalLM = None
try:  # transformers 4.50 and later
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
except ImportError:
    Gemma3ForCausalLM = Gemma3TextConfig = None
try:
    from transformers import Phi3Config, Phi3ForCausalLM
except ImportError:
    Phi3Config = Phi3ForCausalLM = None
try:  # the multimodal Gemma 3 (its language model is what memtune trains)
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
except ImportError:
    Gemma3Config = Gemma3ForConditionalGeneration = SiglipVisionConfig = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
PARITY = os.path.join(BUILD, "tests", "mt_parity")
MEMTUNE = os.path.join(BUILD, "memtune")


def gemma_layers(n, every):
    """Gemma 3's layer_types: one global layer in `every`, the rest sliding."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


def log(*a):
    print(*a, flush=True)


def memtune_parity(model, tokens, B, T, device, out, extra=()):
    """Runs tests/gpu/parity_tool.c; returns logits, mean loss and gradients by name."""
    cmd = [PARITY, "--model", model, "--tokens", tokens, "--batch", str(B), "--seq", str(T), "--device", device,
           "--out", out, *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    log(f"  memtune {device}: {time.time() - t0:.1f}s")
    d = load_file(out)
    return d["logits"], float(d["loss"][0]), {k[5:]: v for k, v in d.items() if k.startswith("grad.")}


def rel(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def grad_stats(got, ref):
    """Cosine similarity and max |got - ref| / max |ref|."""
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30))
    maxrel = float(np.max(np.abs(g - r)) / (np.max(np.abs(r)) + 1e-30))
    return cos, maxrel


def compare_grads(got, ref, names, kind_of):
    """Worst cosine and max relative error per tensor kind."""
    per_kind = {}
    for n in names:
        cos, maxrel = grad_stats(got[n], ref[n])
        k = per_kind.setdefault(kind_of(n), {"tensors": 0, "min_cos": 1.0, "max_maxrel": 0.0})
        k["tensors"] += 1
        k["min_cos"] = min(k["min_cos"], cos)
        k["max_maxrel"] = max(k["max_maxrel"], maxrel)
    return per_kind


def write_dataset(path, tokens, vocab):
    """A memtune dataset (docs/formats.md) of one document."""
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.asarray(tokens).astype(np.uint32))
        f.create_dataset("doc_offsets", data=np.array([0, len(tokens)], dtype=np.uint64))
        f.attrs["format_version"] = np.int32(1)
        f.attrs["vocab_size"] = np.int64(vocab)
        f.attrs["tokenizer"] = "random"
