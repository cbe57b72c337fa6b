#!/usr/bin/env bash
# resnet_jax launcher.
#   ./launch.sh                          train the default experiment (configs/digits_resnet20.py)
#   ./launch.sh [--config.KEY=VALUE ...] the default experiment with overrides
#   ./launch.sh CONFIG[:ARG] [--config.KEY=VALUE ...] [--workdir=DIR] [--allow_config_change]
#                                        train any config file (python -m resnet_jax --help)
#   ./launch.sh --keys [PATTERN]         every config key: type, default, meaning
#   ./launch.sh test [PYTEST_ARGS ...]   run the test suite (first use also sets up the pinned
#                                        PyTorch reference environment: RESNET_JAX_TORCH=0 skips)
#   ./launch.sh setup                    only create/refresh the environment
#   NPROC=N ./launch.sh CONFIG ...       N local processes (coordinator on localhost)
#   srun ./launch.sh CONFIG ...          one process per SLURM task (detected by JAX)
# The project environment (.venv beside this script, or $RESNET_JAX_VENV) is created on first
# use and refreshed whenever pyproject.toml changes.
# (--help prints this header: every line up to the first one that is not a comment.)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${RESNET_JAX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
DEFAULT_CONFIG="$ROOT/configs/digits_resnet20.py"

setup_env() {
  local stamp="$VENV/.resnet_jax-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  echo "launch.sh: setting up $VENV (first use; takes a few minutes) ..." >&2
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || { echo "launch.sh: error: '$PYTHON -m venv' failed" >&2; exit 1; }
  fi
  # (grep drops pip's notes about this machine's unused local index folders)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
    || { echo "launch.sh: error: installing resnet_jax into $VENV failed (see pip output above)" >&2; exit 1; }
  rm -f "$VENV"/.resnet_jax-*
  touch "$stamp"
}

# The reference implementations our weights are proven against (tests/test_torchvision_parity.py)
# in an interpreter of their own: TensorFlow and torch in one process crash. Linux torch
# brings its CUDA libraries (~5.5 GB), so the environment is built once per machine and
# pinned set, outside the checkout, and reused by every clone (RESNET_JAX_TORCH=0: skip it,
# and the parity tests skip saying why).
TORCH_PINS="torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors numpy"

setup_torch_env() {
  [ "${RESNET_JAX_TORCH:-1}" = 0 ] && return 0
  local key env_dir start
  key=$(echo "$TORCH_PINS" | sha256sum | cut -c1-12)
  env_dir="${RESNET_JAX_TORCH_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/resnet_jax/torch-env-$key}"
  if [ ! -f "$env_dir/.complete" ]; then
    echo "launch.sh: setting up the PyTorch reference environment in $env_dir ($TORCH_PINS; once per machine, several GB) ..." >&2
    start=$(date +%s)
    rm -rf "$env_dir"
    "$PYTHON" -m venv "$env_dir" && "$env_dir/bin/python" -m pip install --quiet \
        --disable-pip-version-check $TORCH_PINS \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
      || { echo "launch.sh: error: installing $TORCH_PINS into $env_dir failed (see pip output above; RESNET_JAX_TORCH=0 skips the parity tests)" >&2; exit 1; }
    touch "$env_dir/.complete"
    echo "launch.sh: PyTorch reference environment ready in $(( $(date +%s) - start )) s" >&2
  fi
  export RESNET_JAX_TORCH_PYTHON="$env_dir/bin/python"
}

run() {
  local nproc="${NPROC:-1}"
  if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch.sh: error: NPROC='$nproc': expected a positive integer" >&2; exit 2
  fi
  if [ "$nproc" -gt 1 ]; then
    exec "$VENV/bin/python" -m resnet_jax.local_launcher --nproc "$nproc" -- "$@"
  fi
  exec "$VENV/bin/python" -m resnet_jax "$@"
}

# Quiet TensorFlow's C++ logging (it is only used for tf.data and TensorBoard files).
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [ $# -eq 0 ]; then
  setup_env
  run --config="$DEFAULT_CONFIG"
fi

case "$1" in
  -h|--help)
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    ;;
  --keys)
    setup_env
    exec "$VENV/bin/python" -m resnet_jax "$@"
    ;;
  setup)
    setup_env
    ;;
  test)
    shift
    setup_env
    setup_torch_env
    cd "$ROOT"
    # Two or more pytest-xdist workers unless the arguments choose (-n, --numprocesses,
    # -p no:xdist): the suite's time is mostly XLA compiles, which use one core, and child
    # processes waiting on one another, so on CI's 2 cores two workers take ~12.5 instead
    # of ~18 minutes. At most 4 (RESNET_JAX_TEST_WORKERS overrides): several tests start
    # 8-device or multi-process runs of their own.
    workers=()
    case " $* " in
      *" -n"*|*" --numprocesses"*|*"no:xdist"*) ;;
      *) cores=$(nproc 2>/dev/null || echo 2)
         workers=(-n "${RESNET_JAX_TEST_WORKERS:-$(( cores < 2 ? 2 : (cores > 4 ? 4 : cores) ))}") ;;
    esac
    exec "$VENV/bin/python" -m pytest tests "${workers[@]}" "$@"
    ;;
  "")
    echo "launch.sh: error: an empty argument; expected CONFIG, --config.KEY=VALUE, test or setup (--help)" >&2
    exit 2
    ;;
  --*)
    # Only overrides given: apply them to the default experiment.
    setup_env
    run --config="$DEFAULT_CONFIG" "$@"
    ;;
  *)
    config="$1"; shift
    file="${config%%.py:*}"                     # configs/x.py:arg -> configs/x
    [ "$file" != "$config" ] && file="$file.py"
    if [ ! -f "$file" ]; then
      echo "launch.sh: error: config file '$file' not found (expected e.g. configs/digits_resnet20.py)" >&2
      exit 2
    fi
    setup_env
    run --config="$config" "$@"
    ;;
esac
