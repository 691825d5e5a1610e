#!/usr/bin/env bash
# Build (or reuse) a Python 3.12 venv with google-deepmind's `gemma` for tests/clients/.
#
#   .ci/gemma_venv.sh DIR
#
# gemma 4.x needs Python >= 3.12 and a plain `pip install gemma` backtracks for many
# minutes, so gemma and kauldron go in with --no-deps and then exactly the packages that
# `from gemma import gm, peft` imports, pinned to versions that were seen to work together.
# A second run is a no-op (a few seconds) when DIR already imports everything.
#
# Exit status: 0 ready; 2 usage; 3 no python3.12 on this machine; 4 an install failed;
# 5 DIR exists but is not a venv (left untouched).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
DIR=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY="$DIR/bin/python"

# The check imports from /, so the cwd cannot shadow the installed jax_lora.
check='
import sys
from gemma import gm, peft  # noqa
import jax, flax, optax, orbax.checkpoint, numpy, pytest  # noqa
import jax_lora
print(jax_lora.__file__)
'
ready() {
  local got
  got=$(cd / && "$PY" -c "$check" 2>/dev/null | tail -n 1) || return 1
  [ "$got" = "$REPO/jax_lora/__init__.py" ]
}

# One build at a time per DIR (two test sessions may ask at once).
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9

if [ -e "$DIR" ] && [ ! -f "$DIR/pyvenv.cfg" ]; then
  echo "$DIR exists and is not a venv; refusing to touch it" >&2
  exit 5
fi
if [ -x "$PY" ] && ready; then
  echo "gemma venv ready: $DIR"
  exit 0
fi

if ! PYENV_VERSION=3.12.1 python3.12 -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  echo "python3.12 not found (tried PYENV_VERSION=3.12.1 python3.12)" >&2
  exit 3
fi

pip_install() {
  # The machine's pip config lists local index folders that warn for every missing package.
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || {
    echo "pip install $* failed" >&2
    exit 4
  }
}

[ -x "$PY" ] || PYENV_VERSION=3.12.1 python3.12 -m venv "$DIR"
pip_install --no-deps gemma==4.0.1 kauldron==1.4.4
# jax stack at the versions of the main venv; then what gemma/kauldron import at
# `from gemma import gm, peft` (found by trying the import until it passed).
pip_install \
  jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 \
  numpy==2.4.6 pytest==9.2.0 \
  chex==0.1.92 clu==0.0.12 dialog==1.1.0 einops==0.8.2 grain==0.2.18 \
  immutabledict==4.3.1 jaxtyping==0.3.11 lark==1.3.1 mediapy==1.2.7 \
  ml_collections==1.1.0 pandas==3.1.1 sentencepiece==0.2.3 tensorboard==2.21.0 \
  tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10 tqdm==4.70.1 typeguard==4.6.1
pip_install --no-deps -e "$REPO"

if ! ready; then
  echo "built $DIR but the imports still fail:" >&2
  (cd / && "$PY" -c "$check") >&2 || true
  exit 4
fi
echo "gemma venv ready: $DIR"
