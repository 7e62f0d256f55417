#!/usr/bin/env bash
# Re-resolve both environments from scratch and write the pins (requirements/*.lock).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3.11 -m venv "$tmp/main"
"$tmp/main/bin/pip" install -q --upgrade "pip==26.3"
"$tmp/main/bin/pip" install -q "torch==2.13.0"
"$tmp/main/bin/pip" install -q -e ".[dev]"
"$tmp/main/bin/pip" freeze --exclude-editable > requirements/main.lock
python3.11 -m venv "$tmp/triton"
"$tmp/triton/bin/pip" install -q --upgrade "pip==26.3"
"$tmp/triton/bin/pip" install -q -r requirements/triton.txt
"$tmp/triton/bin/pip" freeze > requirements/triton.lock
rm -rf "$tmp"
echo "lock: wrote requirements/main.lock and requirements/triton.lock"
