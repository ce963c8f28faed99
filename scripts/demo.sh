#!/usr/bin/env bash
# Installs dlf and runs lm-eval with the dlf model on the offline toy registry (the default).
source "$(dirname "$0")/setup-env.sh"
lm_eval run --model dlf --model_args experts=auto \
    --tasks toy_world --include_path tasks \
    --limit 50 --batch_size 16 --output_path out/demo --log_samples "$@"
