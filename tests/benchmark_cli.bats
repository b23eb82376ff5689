#!/usr/bin/env bats
# run_benchmark.sh as a user meets it: help, dry run, and one clear line + exit 2 for every kind of bad input.

setup() {
  cd "$BATS_TEST_DIRNAME/.."
  export RESULTS_DIR="$BATS_TEST_TMPDIR/results"
}

@test "--help lists every variable of the table" {
  run ./run_benchmark.sh --help
  [ "$status" -eq 0 ]
  for v in GPU_STRATEGY TARGET_GPU_RATIO NUM_PROMPTS AUTO_RATE AUTO_DURATION GAMMA_VALUE ENABLE_GPU_MONITOR \
           SHAREGPT_DIR VLLM_NUM_SPECULATIVE_TOKENS VLLM_USE_V2_BLOCK_MANAGER COMPARE_MODES; do
    [[ "$output" == *"$v"* ]] || { echo "missing $v"; return 1; }
  done
}

@test "--dry-run prints the resolved configuration and the plan, builds nothing" {
  GAMMA_VALUE=6 run ./run_benchmark.sh --dry-run --num-prompts 3
  [ "$status" -eq 0 ]
  [[ "$output" == *"GAMMA_VALUE"*"6"*"env"* ]]
  [[ "$output" == *"NUM_PROMPTS"*"3"*"cli"* ]]
  [[ "$output" == *"1. hf:target"* && "$output" == *"2. hf:speculative"* ]]
  [ ! -d "$RESULTS_DIR" ]
}

@test "a bad value of every typed variable: one line naming it, exit 2, no traceback" {
  names=$(.venv/bin/python -c "from lib.config import VARS; print(' '.join(v.name + ':' + v.kind for v in VARS if v.kind in ('int','float','bool','choice')))")
  for item in $names; do
    name=${item%%:*}
    run env "$name=not-a-valid-value" ./run_benchmark.sh --dry-run
    [ "$status" -eq 2 ] || { echo "$name: status $status"; return 1; }
    [[ "$output" == "error: $name='not-a-valid-value'"* ]] || { echo "$name: $output"; return 1; }
    [[ "$output" != *Traceback* ]]
    [ "$(echo "$output" | wc -l)" -eq 1 ]
  done
}

@test "a flag with a bad value is named too" {
  run ./run_benchmark.sh --dry-run --gpu-strategy diagonal
  [ "$status" -eq 2 ]
  [[ "$output" == "error: GPU_STRATEGY='diagonal' (from --gpu-strategy): expected one of multi_gpu_ratio"* ]]
}

@test "missing model folder" {
  TARGET_MODEL=/nonexistent/model DRAFTER_MODEL=/nonexistent/draft run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"error: TARGET_MODEL=/nonexistent/model: no such folder"* ]]
  [[ "$output" != *Traceback* ]]
}

@test "a folder that is not a model" {
  mkdir -p "$BATS_TEST_TMPDIR/notamodel"
  TARGET_MODEL="$BATS_TEST_TMPDIR/notamodel" INFERENCE_METHOD=target run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"not a Hugging Face model folder (no config.json)"* ]]
}

@test "empty and malformed ShareGPT folders" {
  mkdir -p "$BATS_TEST_TMPDIR/empty" "$BATS_TEST_TMPDIR/bad"
  SHAREGPT_DIR="$BATS_TEST_TMPDIR/empty" run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"SHAREGPT_DIR="*"none of sharegpt_gpt4.jsonl"* ]]
  printf 'not json\n{"conversations": 3}\n' > "$BATS_TEST_TMPDIR/bad/sharegpt_V3_format.jsonl"
  SHAREGPT_DIR="$BATS_TEST_TMPDIR/bad" run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"no usable conversations"*"2 malformed"* ]]
  [[ "$output" != *Traceback* ]]
}

@test "rate mode without a duration, and an empty prompt file" {
  AUTO_RATE=2 run ./run_benchmark.sh --dry-run
  [ "$status" -eq 2 ]
  [[ "$output" == "error: AUTO_DURATION=0"* ]]
  : > "$BATS_TEST_TMPDIR/empty.txt"
  PROMPT_FILE="$BATS_TEST_TMPDIR/empty.txt" run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"PROMPT_FILE="*"has no prompts"* ]]
}

@test "requirement sets follow the resolved modes; an unknown engine stops before anything is installed" {
  COMPARE_MODES='hf:target vllm:speculative' run .venv/bin/python benchmark.py --print-requirement-sets
  [ "$status" -eq 0 ]
  [ "$output" = "core vllm" ]
  COMPARE_MODES='hf:target tensorrt:target' run ./run_benchmark.sh --dry-run
  [ "$status" -eq 2 ]
  [[ "$output" == "error: COMPARE_MODES="*"with engine in hf, vllm, sglang, llamacpp, openai and method in"* ]]
  [ "$(echo "$output" | wc -l)" -eq 1 ]
}

@test "nan, inf and sizes beyond the bounds: one line naming the variable, also in --dry-run" {
  for item in TEMPERATURE=nan TEMPERATURE=inf AUTO_RATE=inf NUM_PROMPTS=10000000000 GENERATION_LENGTH=10000000 \
              SEED=1180591620717411303424; do
    run env "$item" AUTO_DURATION=1 ./run_benchmark.sh --dry-run
    [ "$status" -eq 2 ] || { echo "$item: status $status"; return 1; }
    [[ "$output" == "error: ${item%%=*}='${item#*=}' (from the environment): expected "* ]] || { echo "$output"; return 1; }
    [ "$(echo "$output" | wc -l)" -eq 1 ]
  done
  AUTO_RATE=100000 AUTO_DURATION=60 run ./run_benchmark.sh --dry-run
  [ "$status" -eq 2 ]
  [[ "$output" == "error: AUTO_RATE=100000 x AUTO_DURATION=60: about 6e+06 requests; at most 100000 per run" ]]
}

@test "RUN_ID is one folder name; a second run into a finished run's folder needs OVERWRITE=true" {
  RUN_ID=../../escape run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == "error: RUN_ID='../../escape': expected one folder name"* ]]
  mkdir -p "$RESULTS_DIR/done" && echo '{}' > "$RESULTS_DIR/done/run.json"
  RUN_ID=done run ./run_benchmark.sh --num-prompts 1
  [ "$status" -eq 2 ]
  [[ "$output" == *"error: RUN_ID='done': "*"already holds a run (run.json); set OVERWRITE=true"* ]]
  [ "$(cat "$RESULTS_DIR/done/run.json")" = "{}" ]
}
