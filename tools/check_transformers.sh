#!/usr/bin/env bash
# Can the supported range include a transformers release? One command, one answer:
#
#     tools/check_transformers.sh 5.25.0
#
# Builds a fresh venv with that release (CPU torch; without `kernels` where the index lacks it, see
# tools/install_transformers.sh), then runs the test suite, the demo (the README's first command) and the comparison
# with the outputs recorded on the oldest supported release, on this CPU's kernels and on the portable `default`
# ones. Exit status 0 means all passed: raise NEWEST_TESTED in transformers_compat.py and the cap in
# requirements.txt. The venv stays in $CHECK_VENV (default /tmp/dimple-transformers-VERSION) for a closer look.
set -uo pipefail
version=${1:?usage: tools/check_transformers.sh TRANSFORMERS_VERSION}
cd "$(dirname "$0")/.."
venv=${CHECK_VENV:-/tmp/dimple-transformers-$version}

rm -rf "$venv" && python3 -m venv "$venv" && . "$venv/bin/activate" || exit 2
pip install -q torch==2.13.0 && pip install -q -r requirements-dev.txt && bash tools/install_transformers.sh "$version" || {
  echo "could not install transformers $version"; exit 2; }
installed=$(python -c "import transformers; print(transformers.__version__)")
# Without the `kernels` package (an index that lacks it), transformers >= 5.25 must be told not to load Hub kernels.
python -c "import kernels" 2>/dev/null || export USE_HUB_KERNELS=NO

status=0
step() {  # step NAME COMMAND...: run it, record pass/fail
  local name=$1; shift
  if "$@" >"$venv/$name.log" 2>&1; then echo "  $name: passed"; else echo "  $name: FAILED (log: $venv/$name.log)"; status=1; fi
}
echo "transformers $installed:"
export HF_HUB_OFFLINE=1
step suite python -m pytest tests -q -p no:cacheprovider
step demo python examples/demo.py --output "$venv/demo.png"
step outputs python tools/reference_outputs.py --check tools/reference_outputs.json
step outputs-default-cpu-kernels env ATEN_CPU_CAPABILITY=default python tools/reference_outputs.py --check tools/reference_outputs.json
tail -n 3 "$venv/suite.log" | sed 's/^/    /'
if ((status == 0)); then
  echo "transformers $installed passes: the tested range can include it (transformers_compat.NEWEST_TESTED, requirements.txt)."
else
  echo "transformers $installed does not pass: keep the range as it is until the failures above are fixed."
fi
exit $status
