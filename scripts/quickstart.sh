#!/usr/bin/env bash
# The main job. Installs medssm in .venv on first use, then runs it. Extra arguments go to `medssm quickstart`.
source "$(dirname "$0")/env.sh" ""
cd "$root"
exec medssm quickstart "$@"
