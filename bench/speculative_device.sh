#!/usr/bin/env bash
# Speculative decoding's measurements on one device in one go, for a session lent a GPU:
#
#     bash bench/speculative_device.sh [cuda]
#
# 1. the dev split chooses a configuration per batch size (the fastest of k = 3 and 6, with
#    copies, with and without the draft stop, with and without copies from earlier requests;
#    limit 30, one repeat);
# 2. the test split reports those choices (--chosen), k = 3 with copies from the context alone
#    beside them (limit 50, two repeats): the targets speculative_large_passes_per_token_batch{1,8}
#    and speculative_vs_plain_batch1;
# 3. bench/speculative_dtype.py: bfloat16 texts against float32's.
# Every figure goes to stdout; the targets' lines end each bench's part. DEV_LIMIT, TEST_LIMIT,
# REPEATS and DTYPE_LIMIT override the sizes (a smoke run on a CPU: DEV_LIMIT=2 TEST_LIMIT=2 REPEATS=1
# DTYPE_LIMIT=2, about 3 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
python=${PYTHON:-python}
dev_limit=${DEV_LIMIT:-30}
test_limit=${TEST_LIMIT:-50}
repeats=${REPEATS:-2}

echo "== dev: choosing a configuration per batch size ($device)"
dev_log=$(mktemp)
$python bench/speculative.py --device "$device" --split dev --long --drafts 3 6 --lookups 4 --confidences 0 0.2 \
    --histories 0 1 --batches 1 8 --limit "$dev_limit" --repeats 1 | tee "$dev_log"
# "batch B: fastest: speculate=K,lookup=N[,draft_confidence=C][,lookup_history=true]" -> "B:K,N,C,H"
chosen=$($python - "$dev_log" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
pattern = r"batch (\d+): fastest: speculate=(\d+)(?:,lookup=(\d+))?(?:,draft_confidence=([\d.]+))?(,lookup_history=true)?"
print(" ".join(f"{b}:{k},{n or 0},{c or 0},{int(bool(h))}" for b, k, n, c, h in re.findall(pattern, text)))
EOF
)
rm -f "$dev_log"
if [ -z "$chosen" ]; then
    echo "the dev run chose nothing (it failed before its targets): stopping" >&2
    exit 1
fi
echo "== test: the dev choices ($chosen)"
$python bench/speculative.py --device "$device" --split test --long --drafts 3 --lookups 4 --histories 0 --chosen $chosen \
    --batches 1 8 --limit "$test_limit" --repeats "$repeats"
status=$?
echo "== bfloat16 against float32"
$python bench/speculative_dtype.py --device "$device" --split test --limit "${DTYPE_LIMIT:-25}"
exit $status
