#!/usr/bin/env bats
# run_sweep.sh and analyze.py as a user meets them: help, dry run, one clear line + exit code for bad input.

setup() {
  cd "$BATS_TEST_DIRNAME/.."
  OUT="$BATS_TEST_TMPDIR/out"
}

@test "run_sweep.sh --help tells the options and the exit codes" {
  run ./run_sweep.sh --help
  [ "$status" -eq 0 ]
  for word in --resume --budget-min --report-only --date "Exit codes" "75 another sweep holds the lock"; do
    [[ "$output" == *"$word"* ]] || { echo "missing $word"; return 1; }
  done
}

@test "--dry-run lists every combination of the nightly tiny sweep and runs nothing" {
  run ./run_sweep.sh nightly_tiny --dry-run --output-root "$OUT"
  [ "$status" -eq 0 ]
  [ "$(grep -c '^gamma_value-' <<<"$output")" -eq 6 ]
  [[ "$output" == *"gamma_value-6__batch_size-2: "*"GAMMA_VALUE=6 BATCH_SIZE=2"* ]]
  [ ! -d "$OUT" ]
}

@test "an unknown sweep name: one line, exit 2" {
  run ./run_sweep.sh no_such_sweep
  [ "$status" -eq 2 ]
  [[ "$output" == "error: sweep 'no_such_sweep': no such sweep file"*"nightly_tiny"* ]]
  [ "${#lines[@]}" -eq 1 ]
}

@test "a sweep file that is not YAML, or with a reserved variable: one line, exit 2" {
  printf 'matrix: [oops\n' > "$BATS_TEST_TMPDIR/broken.yaml"
  run ./run_sweep.sh "$BATS_TEST_TMPDIR/broken.yaml"
  [ "$status" -eq 2 ]
  [[ "$output" == *"broken.yaml: not valid YAML"* ]]
  printf 'fixed: {RESULTS_DIR: /tmp}\n' > "$BATS_TEST_TMPDIR/reserved.yaml"
  run ./run_sweep.sh "$BATS_TEST_TMPDIR/reserved.yaml"
  [ "$status" -eq 2 ]
  [[ "$output" == *"fixed.RESULTS_DIR: set by the sweep itself"* ]]
}

@test "--report-only on a night that never ran: one line, exit 2" {
  run ./run_sweep.sh nightly_tiny --report-only --date 2001-01-01 --output-root "$OUT"
  [ "$status" -eq 2 ]
  [[ "$output" == *"has no sweep.json"* ]]
  run ./run_sweep.sh nightly_tiny --date 01/02/2001
  [ "$status" -eq 2 ]
  [[ "$output" == *"expected YYYY-MM-DD"* ]]
}

@test "analyze.py on a folder without results: one line, exit 2" {
  mkdir -p "$BATS_TEST_TMPDIR/empty"
  run .venv/bin/python analyze.py "$BATS_TEST_TMPDIR/empty"
  [ "$status" -eq 2 ]
  [[ "$output" == *"no benchmark_results.json under these paths"* ]]
  run .venv/bin/python analyze.py "$BATS_TEST_TMPDIR/nothing-*"
  [ "$status" -eq 2 ]
  [[ "$output" == *"no such folder"* ]]
}

@test "a night that already ran is not overwritten without --resume or --fresh" {
  mkdir -p "$OUT/nightly_tiny/2001-01-01"
  echo '{}' > "$OUT/nightly_tiny/2001-01-01/sweep.json"
  run ./run_sweep.sh nightly_tiny --date 2001-01-01 --output-root "$OUT"
  [ "$status" -eq 2 ]
  [[ "$output" == *"already holds this night's sweep: --resume finishes it, --fresh reruns"* ]]
  [ "$(cat "$OUT/nightly_tiny/2001-01-01/sweep.json")" = '{}' ]
  run ./run_sweep.sh nightly_tiny --date 2001-01-01 --output-root "$OUT" --resume --fresh
  [ "$status" -eq 2 ]
}

@test "--report-only on a damaged sweep.json or a folder in its place: one line naming it, exit 2" {
  night="$OUT/nightly_tiny/2001-01-01"
  mkdir -p "$night"
  echo '[1, 2]' > "$night/sweep.json"
  run ./run_sweep.sh nightly_tiny --report-only --date 2001-01-01 --output-root "$OUT"
  [ "$status" -eq 2 ]
  [ "${#lines[@]}" -eq 1 ]
  [[ "$output" == "error: $night/sweep.json: not a sweep state file: found a list [1, 2]"* ]]
  rm "$night/sweep.json"
  mkdir "$night/sweep.json"
  run ./run_sweep.sh nightly_tiny --report-only --date 2001-01-01 --output-root "$OUT"
  [ "$status" -eq 2 ]
  [ "${#lines[@]}" -eq 1 ]
  [[ "$output" == "error: $night/sweep.json: not a sweep state file: is a folder"* ]]
}
