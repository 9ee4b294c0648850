#!/usr/bin/env bash
# The GPU checks in one place, for a machine with CUDA: `tools/gpu_suite.sh tests` runs the core GPU
# test files (kernels, graphs, overflow buckets, padding rule, undeclared writes, nested regions, HF forwards), `tools/gpu_suite.sh tests-scan`
# the fresh prefill's scan kernels against mamba-ssm (whose autotuning makes them slow to start) and the
# MoE router and experts kernels against HF's,
# `tools/gpu_suite.sh tests-hf` the HF generate() ones (padding, static caches, traffic, the deferred
# stop check, bf16 noise), `tools/gpu_suite.sh bench [bench flags]` the quick benchmark against
# eager, and `tools/gpu_suite.sh profile FAMILY [bench flags]` FAMILY's prefills of 16 and 128 tokens,
# timed and profiled, with lazy capture and no decode graph (the cheapest look at where its time
# goes). Logs go to $OUT
# (default ./gpu_out). Each stage is cut at 9 minutes so that it fits a 10-minute call.
# mamba-ssm / causal-conv1d wheels placed in .whl/ are installed into /tmp/site first, if present.
set -u
cd "$(dirname "$0")/.."
stage=${1:-tests}
shift || true
if [ "$stage" != tests ] && [ "$stage" != tests-scan ] && [ "$stage" != tests-hf ] && [ "$stage" != bench ] \
        && [ "$stage" != profile ]; then
    echo "usage: tools/gpu_suite.sh tests | tests-scan | tests-hf | bench [bench flags] | profile FAMILY [bench flags]" >&2
    exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
    export PYTHONPATH="/tmp/site:$PWD"
fi
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "tools/gpu_suite.sh needs a CUDA GPU; on CPU run: python -m pytest -q tests" >&2
    exit 2
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -c "import torch, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/device.txt"
case "$stage" in
    tests|tests-scan|tests-hf)
        if [ "$stage" = tests ]; then
            files="tests/test_hf_gpu.py tests/test_reliability.py tests/test_cudagraph_gpu.py tests/test_mamba2_prep_gpu.py
                   tests/test_skinny_gemm_gpu.py tests/test_fused_decode_ops_gpu.py tests/test_decode_attention_gpu.py
                   tests/test_padding_rule_gpu.py tests/test_state_update_gpu.py tests/test_overflow_buckets_gpu.py
                   tests/test_write_check.py tests/test_nested_regions.py"
        elif [ "$stage" = tests-scan ]; then
            files="tests/test_short_scan_gpu.py tests/test_one_chunk_scan_gpu.py tests/test_moe_experts_gpu.py"
        else
            files="tests/test_hf_padding_gpu.py tests/test_static_cache_gpu.py tests/test_traffic_gpu.py
                   tests/test_hf_stop_check_gpu.py tests/test_hf_half_precision_gpu.py"
        fi
        # shellcheck disable=SC2086  # the file list is meant to split
        timeout 540 python3 -m pytest -q -rf $files -p no:cacheprovider > "$OUT/$stage.log" 2>&1
        rc=$?
        echo "$stage rc $rc"
        grep -E "passed|failed|^FAILED|^ERROR" "$OUT/$stage.log" | tail -20
        ;;
    bench)
        timeout 540 python3 -m pcg_backend.bench --quick --variants eager,pcg-inductor --prefill 1,16,128,2048 \
            --out "$OUT/bench" "$@" > "$OUT/bench.log" 2>&1
        rc=$?
        echo "bench rc $rc"
        grep -v "capturing graph" "$OUT/bench.log" | tail -30
        ;;
    profile)
        family=${1:?usage: tools/gpu_suite.sh profile FAMILY [bench flags]}
        shift
        timeout 540 python3 -m pcg_backend.bench --family "$family" --variants pcg-inductor --prefill 16,128 \
            --batches "" --profile --pcg-options '{"capture": "lazy"}' --out "$OUT/$family" "$@" \
            > "$OUT/$family.log" 2>&1
        rc=$?
        echo "profile $family rc $rc"
        grep -v "capturing graph" "$OUT/$family.log" | tail -12
        grep "^==" "$OUT/$family/profile_pcg-inductor.txt" 2>/dev/null
        ;;
esac
exit $rc
