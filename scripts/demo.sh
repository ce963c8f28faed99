#!/usr/bin/env bash
# Installs dlf and runs lm-eval with the dlf model on the offline toy registry (the default).
source "$(dirname "$0")/setup-env.sh"
lm_eval run --model dlf --model_args experts=qa+mc \
    --tasks toy_demo_qa,toy_demo_mc --include_path tasks \
    --batch_size 8 --output_path out/demo --log_samples "$@"
