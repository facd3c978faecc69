#!/usr/bin/env bash
# Install what the tests need (in .venv) and run the whole suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" test,nnunet
cd "$root"
exec python -m pytest -n 2 --dist loadfile "$@"
