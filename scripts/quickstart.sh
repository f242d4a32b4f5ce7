#!/usr/bin/env bash
# Builds memtune and runs the quickstart fine-tune: a tiny LLaMA-shaped model
# trained on the King James Bible (Debian's bible-kjv), on the GPU if there
# is one, else on the CPU (well under a minute on 2 cores).
#
# `quickstart.sh lora`: the LoRA variant. LoRA adapters on the quickstart's
# model (trained first if it is missing), fine-tuned on the Psalms, saved in
# PEFT's layout and merged back into a full model (runs/quickstart-lora/).
#
# `quickstart.sh mezo`: the MeZO variant. Every weight of the quickstart's
# model fine-tuned on the Psalms from forward passes alone
# (runs/quickstart-mezo/).
#
# `quickstart.sh galore`: the GaLore variant. Every weight of the
# quickstart's model fine-tuned on the Psalms with low-rank projected Adam
# moments, updated layer by layer in backward (runs/quickstart-galore/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build
cmake --build build -j"$(nproc)"
mkdir -p data
if [ ! -f data/kjv.h5 ]; then
    bible "Gen1:1-Rev22:21" > data/kjv.txt
    ./build/memtune tokenize --input data/kjv.txt --output data/kjv.h5
fi
if [ "${1:-}" = "lora" ] || [ "${1:-}" = "mezo" ] || [ "${1:-}" = "galore" ]; then
    variant=$1
    shift
    if [ ! -f data/psalms.h5 ]; then
        bible "Ps1:1-Ps150:6" > data/psalms.txt
        ./build/memtune tokenize --input data/psalms.txt --output data/psalms.h5
    fi
    [ -f runs/quickstart/model/model.safetensors ] || ./build/memtune train configs/quickstart.yaml
    if [ "$variant" = "mezo" ] || [ "$variant" = "galore" ]; then
        ./build/memtune train "configs/quickstart-$variant.yaml" "$@"
        exit
    fi
    ./build/memtune train configs/quickstart-lora.yaml "$@"
    rm -rf runs/quickstart-lora/merged  # this script's own output of an earlier run
    ./build/memtune merge --model runs/quickstart/model --adapter runs/quickstart-lora/adapter \
        -o runs/quickstart-lora/merged
    exit
fi
# samples of the model's text before training, halfway and at the end
./build/memtune train configs/quickstart.yaml --set train.sample_every=75 \
    --set "train.sample_prompts=And God said|In the beginning" "$@"
