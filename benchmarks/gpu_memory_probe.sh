#!/usr/bin/env bash
# What the 1B spec's layers keep for backward on the GPU, module by module, against the plan
# (benchmarks/memory_probe.py), in each precision and for GPT-2- and Llama-3-shaped layers.
# From a session lent a GPU: the device tool's run with command "bash benchmarks/gpu_memory_probe.sh",
# carry [".whl"], timeout_s 300. Writes $OUT/probe_<case>.json and $OUT/probe.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/_work/gpu_memory_probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
SPEC=specs/gpu-1b.yaml
GPT2="model.normalization=LayerNorm model.activation=gelu model.add_bias_linear=true model.position_embedding_type=learned_absolute model.ffn_hidden_size=8192"
LLAMA3="model.num_query_groups=4 model.qk_layernorm=true"
{
  source benchmarks/gpu_env.sh || exit $?
  probe() { local name=$1; shift; echo "== $name"; timeout 120 python3 benchmarks/memory_probe.py "$SPEC" "$@" --out "$OUT/probe_$name.json"; }
  probe bf16_mb16 stages.1.train.micro_batch_size=16
  probe autocast_mb8 stages.1.train.micro_batch_size=8 stages.1.train.precision=bf16-autocast
  probe fp32_mb4 stages.1.train.micro_batch_size=4 stages.1.train.precision=fp32
  probe gpt2_bf16 model.num_layers=4 stages.1.train.micro_batch_size=8 $GPT2
  probe gpt2_autocast model.num_layers=4 stages.1.train.micro_batch_size=8 stages.1.train.precision=bf16-autocast $GPT2
  probe llama3_bf16 model.num_layers=4 stages.1.train.micro_batch_size=8 $LLAMA3
} 2>&1 | tee "$OUT/probe.log"
