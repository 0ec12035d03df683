# Sourced by the device scripts (gpu_check.sh, gpu_memory_probe.sh): install the carried wheels
# and llmforge from the working tree into /tmp/site beside the image's CUDA torch, and put
# them on PYTHONPATH and PATH. Needs .whl (benchmarks/gpu_wheels.sh) carried to the device.
[ -d .whl ] || { echo ".whl is missing: carry it (see the top of benchmarks/gpu_check.sh)"; return 2; }
# The image's torch stays; only what it lacks goes into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 3
# llmforge itself, from the working tree, with the image's setuptools (no index there).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . || return 3
export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
python3 -c "import torch, megatron.core, pydantic, omegaconf, webdataset, llmforge
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| megatron-core', megatron.core.__version__, '| pydantic', pydantic.VERSION, '| llmforge', llmforge.__version__)" || return 3
