#!/usr/bin/env bash
# Installs dlf with its test extra and runs the whole test suite.
DLF_INSTALL=".[test]" source "$(dirname "$0")/setup-env.sh"
python -m pytest -q "$@"
