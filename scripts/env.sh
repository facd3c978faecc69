# Sourced by the set-up scripts as `source env.sh EXTRAS` (EXTRAS may be ""): create .venv (once) with
# torch==2.13.0 (CPU) and medssm[EXTRAS] installed. EXTRAS must be passed: a sourced script would
# otherwise see its caller's arguments as $1.
# Everything beside torch is installed under constraints.txt so no dependency can swap torch out.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEDSSM_VENV:-$root/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.medssm-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  "$py" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$py" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt" -e "$root${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
export MEDSSM_DATA="${MEDSSM_DATA:-$root/../shared/data}"
