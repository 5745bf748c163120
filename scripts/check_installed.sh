#!/usr/bin/env bash
# The non-editable install check (make check-wheel; .ci/run): runs, in a temporary directory
# outside the checkout, the nemo-minitron of a fresh venv that has `pip install .[hf]`. Checks that the
# package comes from that venv's site-packages, that `--help` of every command and subcommand
# works, and that the quick demo runs end to end (recipes and configs from the wheel).
set -euo pipefail
exe="$(realpath "$1")"
bin="$(dirname "$exe")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
where="$("$bin/python" -c 'import nemo_minitron, os; print(os.path.dirname(nemo_minitron.__file__))')"
case "$where" in
  */site-packages/nemo_minitron) echo "package: $where" ;;
  *) echo "error: nemo_minitron imported from $where, not the venv's site-packages" >&2; exit 1 ;;
esac
# every command path of the CLI (argparse subparsers, recursively)
mapfile -t commands < <("$bin/python" - <<'PY'
import argparse
from nemo_minitron.cli import build_parser

def walk(parser, prefix):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if prefix:
        print(" ".join(prefix))
    for action in subs:
        for name, sub in action.choices.items():
            walk(sub, prefix + [name])

walk(build_parser(), [])
PY
)
"$exe" --help > /dev/null
for c in "${commands[@]}"; do
  # shellcheck disable=SC2086
  if ! out="$("$exe" $c --help 2>&1)"; then
    echo "error: nemo-minitron $c --help failed:" >&2; echo "$out" | tail -5 >&2; exit 1
  fi
done
echo "--help: ${#commands[@]} commands ok"
"$exe" configs > /dev/null
"$exe" demo --quick --workdir demo_out
