#!/usr/bin/env bash
# Install one transformers release into the active venv, also when the package index lacks one of its dependencies:
#
#     tools/install_transformers.sh 5.25.0
#
# transformers 5.25 depends on `kernels` (Hub kernels for CUDA layers), which some indexes and mirrors do not have, so
# `pip install transformers==5.25.0` cannot resolve there. Then the release is installed with `--no-deps` and each of
# its requirements on its own; only `kernels` may be left out, and transformers then needs `USE_HUB_KERNELS=NO` (its
# `from_pretrained` loads Hub kernels by default and refuses to load without the package). Exit status 1 when another
# requirement cannot be installed.
set -euo pipefail
version=${1:?usage: tools/install_transformers.sh TRANSFORMERS_VERSION}
if pip install -q "transformers==$version" 2>/dev/null; then
  exit 0
fi
pip install -q --no-deps "transformers==$version"
requirements=$(python -c 'from importlib.metadata import requires
print("\n".join(r for r in requires("transformers") if "extra ==" not in r))')
status=0
while read -r requirement; do
  pip install -q "$requirement" 2>/dev/null && continue
  if [[ $requirement == kernels* ]]; then
    echo "transformers $version installed without $requirement (not on the index): run it with USE_HUB_KERNELS=NO"
  else
    echo "transformers $version: could not install its requirement $requirement"; status=1
  fi
done <<<"$requirements"
exit $status
