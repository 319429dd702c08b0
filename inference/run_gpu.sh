#!/usr/bin/env bash
# Every GPU figure of docs/RESULTS.md (issue 8), on the device machine:
#   bash inference/run_gpu.sh OUT_DIR [PHASE[,PHASE...]]      (default: full)
# check: GPU tests, the 8192x8192 kernels, the Llama-2-7B decode.  full: every shape, layer and decode benchmark.
# tests: the GPU tests (tests-a, tests-b: their halves, for a cold Triton cache).  configs: float16-pair GEMV configurations at 3 and 4 bits on three shapes.
# mma: every tensor-core GEMV configuration at 2/3/4/8 bits on three shapes.
# gemv: the batch-1 GEMV of every width on the 7B/70B shapes (tuner choices included).
# floor: the read floor (a kernel that only reads) at the byte counts of int4 8192x8192, 4096x4096, 28672x8192,
#   and the int4 8192x8192 and 4096x4096 codes read in row tiles as the tensor-core GEMV reads them.
# ncu: Nsight Compute counters (DRAM throughput, occupancy, stall reasons) of the int4 8192x8192 tensor-core
#   GEMV and of the read floor kernel at the same bytes.
# raw: the GEMV tests, then the tensor-core GEMV reading x itself (X_LOAD 2) against arranged activations.
# fused: the Llama-2-7B mixed4-tied decode (compiled) with its layers apart and with q/k/v and gate/up each
#   stacked into one wider layer (--fuse), both models alike.
# pdl: the tensor-core GEMV reading x itself launched as a programmatic dependent (its test, then a sweep
#   with and without PDL on the 7B shapes; the harness replays calls back to back, as a decode step runs them).
# int3: the GPU tests of the 16-byte int3 loads the seventh session could not finish (every GEMV choice at
#   int3, the unmasked tensor-core path at 3 bits), then the compiled, stacked Llama-2-7B mixed4-tied decode.
# unpacked: for the tensor-core GEMV whose MMAs take the unpacked pairs M + q on arranged activations
#   (2dc8c51), the GEMV tests, then a sweep of the arranged configurations beside the current best ones.
# stacked: with the unpacked-pair GEMV, the compiled, stacked Llama-2-7B mixed4-tied decode (run i's command),
#   then split-K and narrow arranged configurations (which its 62-90-register int4 loops may now fit, more
#   warps per SM where the grid caps them) on the stacked 7B shapes and 8192x8192 at 3 and 4 bits.
# rawpairs: every GPU test (the MMAs on unpacked pairs reading x itself, 6ee72a1, were checked only at int4 and
#   int2; an HQQ layer through every launch choice is new), then that step against the older one (sixth
#   element 1) on the stacked 7B shapes at 2/3/4/8 bits.
# retune: whether the tuner's choices repeat (flush timed once, close choices re-timed; 22bcd0f): the batch-1
#   GEMV table on 4096x4096 and 8192x8192 at 2/3/4/8 bits tuned in two processes, their choices side by side.
# gated: the GPU tests of the gated gate/up epilogue and the one-token attention kernel (written without a GPU).
# attention: the compiled, stacked Llama-2-7B mixed4-tied decode with bitalloc's one-token attention kernel
#   (profiled) and with SDPA's memory-efficient kernel, both models alike (torch's own pick, cuDNN, ~7 us a layer).
# split: the one-token attention kernel with the cache split over programs (flash-decoding, merged by the last
#   program of a head): its GPU tests, then the compiled, stacked Llama-2-7B mixed4-tied decode through it (profiled).
# gatedonly: the compiled, stacked Llama-2-7B mixed4-tied decode with torch's own attention (run o's command, now
#   with the gated gate/up GEMV), profiled.
# cache: the compiled, stacked Llama-2-7B mixed4-tied decode (split attention) in two processes sharing one tuner
#   cache file: the second takes the first's launches back instead of timing them.
# replay: run r's decode (split attention) twice, each process taking run r's launch choices back
#   (--tuner-choices), so the spread between processes is the gaps' alone.
# decode: the Llama-2-7B mixed4 decode, eager steps in graphs and torch.compile'd steps in graphs, with
#   a per-kernel GPU-time profile of a few steps of each.
set -uo pipefail
out=${1:?output directory}; phase=${2:-full}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export BITALLOC_TUNER_CACHE=off  # every benchmark process times its launches afresh, as docs/RESULTS.md describes
# compiled kernels of an earlier session, if carried along (saves compile time)
if [ -f triton_cache.tgz ]; then mkdir -p ~/.triton && tar xzf triton_cache.tgz -C ~/.triton; fi
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
run_phase() {
case "$1" in
check)
  python -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.txt"
  python inference/kernel_bench.py --models llama-2-70b --layers q/o_proj --out "$out/kernels_8192" 2>&1 | tail -45
  python inference/int8_layouts.py --out "$out/int8_layouts.txt" 2>&1 | tail -14
  python inference/decode.py --config llama-2-7b --mix mixed4 --out "$out/decode_llama2_7b" 2>&1 | tail -8
  rm -f "$out"/*.png "$out"/*_latency.csv "$out"/*_plan.json "$out"/*.csv  # at most 8 files come back
  ;;
tests)  # 8-10 minutes with a cold Triton cache, which may exceed a call: then tests-a and tests-b, a call each
  timeout 560 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.txt" | tail -3
  ;;
tests-a|tests-b)  # the first or the second half of the GPU tests, in collection order
  mapfile -t ids < <(python -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_gpu.py | grep '::')
  half=$(( (${#ids[@]} + 1) / 2 ))
  if [ "$1" = tests-a ]; then chosen=("${ids[@]:0:half}"); else chosen=("${ids[@]:half}"); fi
  timeout 560 python -m pytest -q -rf -p no:cacheprovider "${chosen[@]}" 2>&1 | tee "$out/pytest_gpu_$1.txt" | tail -3
  ;;
configs)
  shapes=8192x8192,4096x4096,11008x4096
  timeout 200 python inference/gemv_configs.py --kernel gemv-pairs --bits 3 --shapes $shapes --top 8 --configs \
    4/1/1/2,4/1/1/4,2/1/1/4,2/2/1/4,4/2/1/2,4/2/1/4,8/1/1/4,8/1/1/2,2/1/1/8,4/1/2/4,1/2/1/4,2/2/1/2 \
    2>&1 | tee "$out/gemv_pairs_configs.txt"
  timeout 100 python inference/gemv_configs.py --kernel gemv-pairs --bits 4 --shapes $shapes --top 8 --configs \
    4/4/1/2,4/4/1/1,2/4/1/2,2/4/1/1,4/2/1/2,2/8/1/2,1/4/1/4,8/4/1/2 2>&1 | tee -a "$out/gemv_pairs_configs.txt"
  ;;
mma)
  timeout 240 python inference/gemv_configs.py --kernel gemv-mma --bits 4,3,2,8 --top 8 \
    --shapes 8192x8192,4096x4096,11008x4096 2>&1 | tee "$out/gemv_mma_configs.txt"
  ;;
gemv)
  timeout 360 python inference/kernel_bench.py --layers "q/k/v/o_proj,gate/up_proj,down_proj,q/o_proj" --batches 1 \
    --backends '{"triton": ["rtn:int2:g128:asym","rtn:int3:g128:asym","rtn:int4:g128:asym","rtn:int8:g128:asym"]}' \
    --out "$out/kernels_gemv" 2>&1 | grep -E "roofline|triton|dense"
  rm -f "$out"/*.png "$out"/*_latency.csv
  ;;
raw)
  timeout 300 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "every_gemv or tensor_core or triton_matches" 2>&1 | tee "$out/pytest_gpu_raw.txt" | tail -3
  timeout 260 python inference/gemv_configs.py --kernel gemv-mma --bits 4,2,3,8 --top 6 \
    --shapes 8192x8192,4096x4096,11008x4096 --configs \
    8/1/4/1,8/1/4/0,4/1/4/1,8/1/4/2,8/1/8/2,4/1/4/2,4/1/8/2,2/1/4/2,2/1/8/2,8/2/4/2,4/2/4/2 \
    2>&1 | tee "$out/gemv_mma_raw_configs.txt"
  ;;
floor)
  timeout 120 python inference/read_floor.py --mb 35.6,8.9,124.7 2>&1 | tee "$out/read_floor.txt"
  for rows_of in 33.6/1024 8.4/512; do  # int4 8192x8192 and 4096x4096 codes, read as the tensor-core GEMV does
    timeout 100 python inference/read_floor.py --mb ${rows_of%/*} --row-words ${rows_of#*/} 2>&1 \
      | tail -2 | tee -a "$out/read_floor.txt"
  done
  ;;
ncu)
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
  metrics+=,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active
  metrics+=,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
  metrics+=,l1tex__t_sector_hit_rate.pct,lts__t_sector_hit_rate.pct,l1tex__throughput.avg.pct_of_peak_sustained_active
  for stall in long_scoreboard lg_throttle wait not_selected math_pipe_throttle short_scoreboard no_instruction \
      barrier mio_throttle drain; do
    metrics+=,smsp__average_warps_issue_stalled_${stall}_per_issue_active.ratio
  done
  timeout 150 ncu --clock-control none --kernel-name regex:gemv_mma --launch-skip 3 --launch-count 1 \
    --metrics "$metrics" python inference/gemv_configs.py --kernel gemv-mma --bits 4 --shapes 8192x8192 \
    --configs 8/1/4 --top 1 2>&1 | grep -v "^==PROF==" | tee "$out/ncu_gemv_mma_int4_8192.txt"
  timeout 100 ncu --clock-control none --kernel-name regex:stream_read --launch-skip 8 --launch-count 1 \
    --metrics "$metrics" python inference/read_floor.py --mb 35.6 2>&1 | grep -v "^==PROF==" \
    | tee "$out/ncu_read_floor_35mb.txt"
  ;;
decode)
  timeout 150 python inference/decode.py --config llama-2-7b --mix mixed4 --profile 3 --out "$out/decode" 2>&1 | tail -4
  timeout 300 python inference/decode.py --config llama-2-7b --mix mixed4 --compile --profile 3 \
    --out "$out/decode_compiled" 2>&1 | tail -4
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
pdl)
  timeout 150 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py -k programmatic \
    2>&1 | tee "$out/pytest_gpu_pdl.txt" | tail -3
  timeout 150 python inference/gemv_configs.py --kernel gemv-mma --bits 4,8,3 --top 8 \
    --shapes 4096x4096,11008x4096,4096x11008,8192x8192 --configs \
    8/1/4/1,8/1/4/2,8/1/4/2/1,4/1/8/2,4/1/8/2/1,8/1/8/2,8/1/8/2/1,4/1/16/2,4/1/16/2/1,2/1/8/2,2/1/8/2/1 \
    2>&1 | tee "$out/gemv_mma_pdl.txt"
  ;;
fused)
  for fuse in "" --fuse; do
    timeout 280 python inference/decode.py --config llama-2-7b --mix mixed4-tied $fuse --compile --profile 3 \
      --out "$out/decode_tied${fuse:+_fused}" 2>&1 | tail -4
  done
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
stacked)
  timeout 300 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --profile 3 \
    --out "$out/decode_tied_fused_unpacked" 2>&1 | tail -4
  timeout 200 python inference/gemv_configs.py --kernel gemv-mma --bits 4,3 --top 8 \
    --shapes 12288x4096,22016x4096,4096x4096,4096x11008,8192x8192 --configs \
    8/1/4/1,8/1/4/0,8/2/4/1,4/2/4/1,8/2/4/0,2/1/4/1,2/1/8/1,1/1/4/1,2/2/4/1,8/1/4/1/0/1,4/1/16/2/1 \
    2>&1 | tee "$out/gemv_mma_stacked.txt"
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
rawpairs)
  timeout 330 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.txt" | tail -3
  timeout 200 python inference/gemv_configs.py --kernel gemv-mma --bits 4,3,8,2 --top 8 \
    --shapes 12288x4096,22016x4096,4096x4096,4096x11008 --configs \
    8/1/4/2,8/1/4/2/0/1,4/1/16/2/1,4/1/16/2/1/1,2/1/4/2,2/1/4/2/0/1,8/1/8/2,8/1/8/2/0/1,4/1/4/1 \
    2>&1 | grep -v skipped | tee "$out/gemv_mma_rawpairs.txt"
  ;;
int3)
  timeout 240 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "(every_gemv and int3) or (without_masks and 3)" 2>&1 | tee "$out/pytest_gpu_int3.txt" | tail -3
  timeout 300 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --profile 3 \
    --out "$out/decode_tied_fused_int3" 2>&1 | tail -4
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
unpacked)
  timeout 300 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "every_gemv or tensor_core or triton_matches" 2>&1 | tee "$out/pytest_gpu_unpacked.txt" | tail -3
  timeout 260 python inference/gemv_configs.py --kernel gemv-mma --bits 4,8,2,3 --top 8 \
    --shapes 8192x8192,4096x4096,4096x11008,22016x4096 --configs \
    8/1/4/1,8/1/8/1,8/1/4/0,8/1/16/1,4/1/16/1,4/1/4/1,4/1/8/1,8/1/4/2,4/1/16/2/1 2>&1 | tee "$out/gemv_mma_unpacked.txt"
  ;;
gated)
  timeout 400 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "gated or one_token or graph_decoding or fused_triton" 2>&1 | tee "$out/pytest_gated.txt" | tail -3
  ;;
attention)
  for kernel in triton efficient; do
    profile=$([ $kernel = triton ] && echo 3 || echo 0)
    timeout 290 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --profile $profile \
      --attention $kernel --out "$out/decode_attention_$kernel" 2>&1 | tail -3
  done
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
split)
  timeout 200 python -m pytest -q -rf -p no:cacheprovider tests/test_kernels_gpu.py -k "one_token" 2>&1 \
    | tee "$out/pytest_split.txt" | tail -3
  timeout 290 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --profile 3 \
    --attention triton --out "$out/decode_split_attention" 2>&1 | tail -3
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
gatedonly)
  timeout 290 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --profile 3 \
    --out "$out/decode_gated" 2>&1 | tail -3
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
replay)
  for run in a b; do  # two processes launching the same kernels: what is left of the spread is the gaps'
    timeout 280 python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --attention triton \
      --tuner-choices results/h200_split/decode_split_attention_tuner.json --out "$out/decode_replay_$run" 2>&1 | tail -3
  done
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
cache)
  for run in a b; do  # the second process takes the first one's launches from the tuner cache file
    start=$(date +%s)
    BITALLOC_TUNER_CACHE="$out/tuner_cache.json" timeout 280 python inference/decode.py --config llama-2-7b \
      --mix mixed4-tied --fuse --compile --attention triton --out "$out/decode_cache_$run" 2>&1 | tail -2
    echo "process $run: $(( $(date +%s) - start )) s"
  done 2>&1 | tee "$out/decode_cache.txt"
  python -c "import json; a, b = (json.load(open(f'$out/decode_cache_{r}_tuner.json')) for r in 'ab')
print(len(a), 'choices;', 'the same in both processes' if a == b else 'DIFFERENT')" | tee -a "$out/decode_cache.txt"
  rm -f "$out"/*.png "$out"/*_plan.json
  ;;
retune)
  for run in a b; do
    timeout 240 python inference/kernel_bench.py --layers "q/k/v/o_proj,q/o_proj" --batches 1 --backends \
      '{"triton": ["rtn:int2:g128:asym","rtn:int3:g128:asym","rtn:int4:g128:asym","rtn:int8:g128:asym"]}' \
      --out "$out/retune_$run" 2>&1 | grep -E "triton|dense"
  done
  python -c "import json; a, b = (json.load(open(f'$out/retune_{r}_tuner.json')) for r in 'ab')
for key in sorted(a): print(key, a[key], b.get(key), 'same' if a[key] == b.get(key) else 'DIFFERENT')" \
    | tee "$out/retune_choices.txt"
  rm -f "$out"/*.png "$out"/*_latency.csv
  ;;
full)
  timeout 90 python -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.txt" | tail -3
  timeout 150 python inference/kernel_bench.py --layers "q/k/v/o_proj,gate/up_proj,down_proj,q/o_proj" \
    --batches 1,4,16,64,256 --out "$out/kernels_h100" 2>&1 | grep -E "roofline| 1 |256 " | grep -v down_proj.*28672
  timeout 80 python inference/decode.py --config llama-2-7b --mix mixed4 --out "$out/decode_llama2_7b" 2>&1 | tail -4
  timeout 50 python inference/layers.py --mixes mixed4,int4,w8a8 --out "$out/layers_h100" 2>&1 | tail -14
  rm -f "$out"/*_plan.json "$out"/decode_llama2_7b.png "$out"/decode_llama2_7b.txt  # at most 8 files come back
  ;;
*) echo "unknown phase $1"; return 2 ;;
esac
}
IFS=, read -ra chosen <<< "$phase"
for one in "${chosen[@]}"; do echo "== $one"; run_phase "$one"; done
[[ ",$phase," == *,check,* ]] && tar czf "$out/triton_cache.tgz" -C ~/.triton cache 2>/dev/null; true
