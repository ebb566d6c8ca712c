#!/usr/bin/env bash
# Runs this checkout's test suite (and, with --audit, the offline compile audit) under one
# torch x triton pair, in a venv of its own. CI runs the pinned stack only; this script is
# how the other rows of the README's stack table were produced and how to rerun them.
#
#   tools/stacks.sh [options] TORCH [TRITON] [-- PYTEST_ARGS...]
#
#   TORCH, TRITON    versions to install (`pip install torch==TORCH triton==TRITON`);
#                    without TRITON, the one that torch pins
#   --python PY      interpreter for a new venv (default: python3)
#   --venv DIR       the venv (default: $STACKS_DIR/torch-TORCH-triton-TRITON-PYVER,
#                    STACKS_DIR defaulting to ~/.cache/triton_xent-stacks); made if absent,
#                    and reused as it is when it already holds these torch and triton
#   --numpy SPEC     a numpy requirement, e.g. '<2.4' (Triton 3.6 and older: see README)
#   --pip REQ        one more requirement, e.g. 'transformers<5' (repeatable)
#   --audit          also compile the kernels offline (the audit script, run without the
#                    interpreter: every launch the launchers make, built to machine code)
#   --audit-cases L  only these of its cases, comma-separated (default: all)
#   --audit-script S the audit script (default: bench/compile_audit.py)
#   --no-tests       skip the test suite (with --audit: the audit only)
#   --log FILE       the log (default: $STACKS_DIR/logs/<venv name>-<UTC time>.log)
#
# The checkout is installed into the venv with `pip install --no-deps -e`, so a venv can be
# pointed at any checkout by running this script from it. Every step goes to the log; the
# last lines of the log (and of stdout) are the versions and pytest's summary line.
#
# Examples (the README's table):
#   tools/stacks.sh --python python3.12 --numpy '<2.4' --audit 2.11.0 3.6.0
#   tools/stacks.sh --audit 2.14.1
#   tools/stacks.sh --numpy '<2.4' --pip 'transformers<5' --audit 2.8.0 3.4.0
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACKS_DIR="${STACKS_DIR:-$HOME/.cache/triton_xent-stacks}"
PY=python3 VENV="" NUMPY="" AUDIT="" AUDIT_CASES="" AUDIT_SCRIPT=bench/compile_audit.py TESTS=1 LOG=""
ARGS=() EXTRA=()
while (($#)); do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --numpy) NUMPY="$2"; shift 2 ;;
        --pip) EXTRA+=("$2"); shift 2 ;;
        --audit) AUDIT=1; shift ;;
        --audit-cases) AUDIT=1; AUDIT_CASES="$2"; shift 2 ;;
        --audit-script) AUDIT=1; AUDIT_SCRIPT="$2"; shift 2 ;;
        --no-tests) TESTS=""; shift ;;
        --log) LOG="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
PYTEST_ARGS=("$@")
((${#ARGS[@]} >= 1 && ${#ARGS[@]} <= 2)) || { echo "usage: $0 [options] TORCH [TRITON] [-- PYTEST_ARGS]" >&2; exit 2; }
TORCH="${ARGS[0]}" TRITON="${ARGS[1]:-}"

if [[ -z "$VENV" ]]; then
    PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    VENV="$STACKS_DIR/torch-$TORCH-triton-${TRITON:-pinned}-py$PYVER"
fi
NAME="$(basename "$VENV")"
mkdir -p "$STACKS_DIR/logs"
LOG="${LOG:-$STACKS_DIR/logs/$NAME-$(date -u +%Y%m%dT%H%M%SZ).log}"
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) checkout $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')), venv $VENV, log $LOG"

VPY="$VENV/bin/python"
[[ -x "$VPY" ]] || "$PY" -m venv "$VENV"
have() {  # whether the venv holds torch==$TORCH (any local build) and the wanted triton
    "$VPY" - "$TORCH" "$TRITON" <<'EOF'
import sys
try:
    import torch, triton
except ImportError:
    sys.exit(1)
want_torch, want_triton = sys.argv[1], sys.argv[2]
ok = torch.__version__.split("+")[0] == want_torch and (not want_triton or triton.__version__ == want_triton)
sys.exit(0 if ok else 1)
EOF
}
# The test extras, read from pyproject.toml (tomllib, or pip's own copy of tomli on 3.10).
EXTRAS="$("$VPY" - "$ROOT/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print(" ".join(project["optional-dependencies"]["test"]))
EOF
)"
PINS=("torch==$TORCH")
[[ -n "$TRITON" ]] && PINS+=("triton==$TRITON")
[[ -n "$NUMPY" ]] && PINS+=("numpy$NUMPY")
PINS+=("${EXTRA[@]}")
if have; then
    echo "== the venv already holds torch $TORCH${TRITON:+ and triton $TRITON}"
    # shellcheck disable=SC2086  # EXTRAS is a list of requirements
    "$VPY" -m pip install -q "${PINS[@]}" $EXTRAS
else
    echo "== pip install ${PINS[*]} $EXTRAS (a CUDA build of torch is several GB)"
    "$VPY" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086  # EXTRAS is a list of requirements
    "$VPY" -m pip install -q "${PINS[@]}" numpy $EXTRAS
fi
"$VPY" -m pip install -q --no-deps -e "$ROOT"
cd "$ROOT"
STACK="$("$VPY" -c 'import sys, numpy, torch, triton, triton_xent, os
assert triton_xent.__file__.startswith(os.getcwd()), triton_xent.__file__
try:
    import transformers
    hf = f", transformers {transformers.__version__}"
except ImportError:
    hf = ""
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}{hf}")')"
echo "== $STACK"

STATUS=0
if [[ -n "$TESTS" ]]; then
    echo "== python -m pytest -q ${PYTEST_ARGS[*]}"
    start=$SECONDS
    "$VPY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}" || STATUS=$?
    echo "== pytest exit $STATUS after $((SECONDS - start)) s"
fi
if [[ -n "$AUDIT" ]]; then
    ONLY=()
    [[ -n "$AUDIT_CASES" ]] && ONLY=(--only ${AUDIT_CASES//,/ })
    echo "== offline compile audit: python $AUDIT_SCRIPT ${ONLY[*]}"
    start=$SECONDS
    cache="$(mktemp -d)"  # an empty Triton cache: every launch is compiled by this Triton
    env -u TRITON_INTERPRET TRITON_CACHE_DIR="$cache" "$VPY" "$AUDIT_SCRIPT" "${ONLY[@]}" \
        || STATUS=$?
    rm -rf "$cache"
    echo "== audit done after $((SECONDS - start)) s"
fi
echo "== $STACK: exit $STATUS; log $LOG"
exit "$STATUS"
