#!/usr/bin/env bash
# Install what the tests need (in .venv) and run the whole suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" test,nnunet
cd "$root"
# The tests of report.html run in the operating system's headless Chromium (Debian's package; no
# browser is downloaded at run time). Installed here when missing and apt-get can; where it cannot,
# those tests skip and say why.
if [ -z "${MEDSSM_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser tests ..."
  { timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium; } \
    >/tmp/medssm-chromium-install.log 2>&1 \
    || echo "could not install chromium (see /tmp/medssm-chromium-install.log): the browser tests will skip"
fi
exec python -m pytest -n 2 --dist loadfile "$@"
