#!/usr/bin/env bash
# Prepares an offline GPU host (the `device` machines: torch/transformers/pybind11/scikit-build-core present,
# no registry) for benchmarks/model_free.py and regular_flow.py: wheels carried in .whl/ (auto-round 0.16.1 and
# what it imports that the host lacks: pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, datasets, dill,
# multiprocess; `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`), nlohmann/json headers carried in .deps/nlohmann-json (Debian's nlohmann-json3-dev, unpacked), then builds
# fastround against the host's torch. Idempotent: a second call only re-exports PYTHONPATH.
#   source benchmarks/device_setup.sh
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import fastround" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . \
    -Ccmake.define.nlohmann_json_DIR="$PWD/.deps/nlohmann-json/usr/share/cmake/nlohmann_json"
fi
python3 -c "import fastround, auto_round, torch; print('fastround', fastround.__version__, '| auto-round', auto_round.__version__, '| torch', torch.__version__)"
