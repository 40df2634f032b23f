#!/usr/bin/env bash
# The CI gate: run suites/ci.yaml from scratch and compare it with the committed baseline (baselines/ci).
# Exit status: bench compare's (0 every check holds, 1 a regression, 2 unusable input).
#   CI_RESULTS       results folder (default results/ci-gate; emptied first unless CI_REUSE=1)
#   CI_BASELINE      baseline name or folder (default ci)
#   CI_MAX_SLOWDOWN  relative DP-overhead growth that fails (default 4.0, i.e. 5x). The suite's epochs last 0.02-0.4 s
#                    and another CPU-bound process on the machine slows torch's threads 10-100x, so speed is judged
#                    by the overhead ratio only (--overhead-only) and only gross slowdowns fail; accuracy, epsilon,
#                    noise and status are judged exactly. Measure speed with full suites (suites/speed.yaml).
set -uo pipefail
BIN=${BIN:-.venv/bin}
results=${CI_RESULTS:-results/ci-gate}
baseline=${CI_BASELINE:-ci}
if [ "${CI_REUSE:-0}" != 1 ]; then
  rm -rf "$results"
fi
# A run that fails is judged by the comparison (ok in the baseline, now failed: a regression), so go on.
"$BIN/bench" run ci --results "$results"
"$BIN/bench" report "$results" --suite ci --out "${CI_REPORT:-reports/ci.html}" || exit 2
"$BIN/bench" compare "$results" --baseline "$baseline" --suite ci \
  --overhead-only --max-slowdown "${CI_MAX_SLOWDOWN:-4.0}" --max-accuracy-drop "${CI_MAX_ACCURACY_DROP:-0.01}" \
  --max-memory-growth "${CI_MAX_MEMORY_GROWTH:-0.5}"
