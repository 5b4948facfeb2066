#!/usr/bin/env bash
# The prepared GPU check (issue 18), for a machine with CUDA and NCCL but no Rust toolchain.
#
# Built here (a CPU machine), into the ignored folder gpu-bin/:
#   cargo build --release -p harness -p comm-nccl \
#       --features harness/cuda,harness/nccl,comm-nccl/nccl --bin harness --example nccl_check
#   mkdir -p gpu-bin && cp target/release/harness target/release/examples/nccl_check gpu-bin/
#   strip gpu-bin/*
# Run there from the repository root: bash tools/gpu/check.sh > gpu-check.txt
#
# 1. NCCL on the GPUs of this machine (one rank per GPU): every operation against host values,
#    mismatches, abort, an all-reduce timing.
# 2. The fixture forward cases on CUDA with serial and every strategy on 2 ranks sharing GPU
#    0 (NCCL refuses two ranks on one GPU, so --comm auto uses the in-process communicator):
#    `forward` prints each one's relative L2 error against diffusers' output, which the CPU
#    path meets within 1.2e-6 (the bar is 1e-5).
# 3. A guided 20-step run of the bundled pipeline on CUDA, f32 and bf16, timed.
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${BIN:-gpu-bin}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
ldconfig -p | grep -E "libnccl|libcuda" || true
# cudarc looks for libnccl.so (not .so.2): point it at the runtime library when needed.
if ! ldconfig -p | grep -q "libnccl.so "; then
    so=$(ldconfig -p | awk '/libnccl.so.2 /{print $NF; exit}')
    if [ -n "$so" ]; then
        mkdir -p /tmp/nccl-link && ln -sf "$so" /tmp/nccl-link/libnccl.so
        export LD_LIBRARY_PATH=/tmp/nccl-link:${LD_LIBRARY_PATH:-}
    fi
fi
status=0
echo "=== 1. NCCL"
"$bin/nccl_check" || status=1

echo "=== 2. forward cases on CUDA"
out=$(mktemp -d)
for model in fixtures/dit/pixart-alpha fixtures/dit/pixart-sigma fixtures/dit/dit; do
    for case in square tall; do
        inputs=$model/cases/$case.safetensors
        [ -f "$inputs" ] || continue
        for s in "serial 1" "tensor 2" "ulysses 2" "ring 2" "naive_patch 2" "distrifusion 2" "pipefusion 2"; do
            set -- $s
            printf '%s %s %s: ' "$model" "$case" "$1 x $2"
            "$bin/harness" forward --backend cuda --devices 0 --model "$model" --inputs "$inputs" \
                --output "$out/o.safetensors" --strategy "$1" --world-size "$2" 2>&1 \
                | grep -E "relative L2|error" | head -1 || status=1
        done
    done
done
rm -rf "$out"

echo "=== 3. the bundled pipeline, 20 steps"
for dtype in f32 bf16; do
    /usr/bin/time -f "$dtype: %e s wall, %M KiB peak host RSS" "$bin/harness" run configs/demo.toml \
        --backend cuda --steps 20 --dtype "$dtype" --no-progress --output "/tmp/demo-$dtype.png" \
        || status=1
    nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
done
exit $status
