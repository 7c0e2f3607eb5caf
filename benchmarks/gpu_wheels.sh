#!/usr/bin/env bash
# Wheels for mergekit 0.1.5 on the device machine (issue 33, item 3): that machine has no package
# index, Python 3.12 (x86_64, manylinux) and torch 2.11 (cu130) already. This downloads mergekit
# and every dependency except torch (and torch's own: nvidia-*, triton) into .whl-mergekit/
# (ignored by git), to carry there; gpu_check.sh installs them with
# `pip install --no-index --find-links .whl-mergekit` into a private folder.
#
#     bash benchmarks/gpu_wheels.sh            # then: du -sh .whl-mergekit
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="${DEST:-.whl-mergekit}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
      --platform any)
# mergekit's requirement list minus torch: resolved here (pip download resolves the tree), then
# torch's own dependencies are dropped (the device has them)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" mergekit==0.1.5
REQS=$("$PY" - "$DEST" <<'PYEOF'
import sys, zipfile, glob, re
whl = glob.glob(sys.argv[1] + "/mergekit-0.1.5-*.whl")[0]
meta = next(n for n in zipfile.ZipFile(whl).namelist() if n.endswith("METADATA"))
reqs = []
for line in zipfile.ZipFile(whl).read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        spec = line.split(":", 1)[1].strip().split(";")[0].strip()
        if not re.match(r"torch\b", spec):
            reqs.append(spec.replace(" ", ""))
print(" ".join(reqs))
PYEOF
)
echo "mergekit 0.1.5 requires (torch left out): $REQS"
# the resolver needs torch's pin satisfiable: constrain it to the device's torch, then delete it
echo "torch==2.11.0" > "$DEST/.constraints"
"$PY" -m pip download -q "${PLAT[@]}" -d "$DEST" $REQS -c "$DEST/.constraints" || \
    "$PY" -m pip download -q "${PLAT[@]}" -d "$DEST" $REQS
rm -f "$DEST"/torch-*.whl "$DEST"/nvidia_*.whl "$DEST"/triton-*.whl "$DEST"/.constraints
# the carry to the device is 64 MiB in all: leave out what the device image has (torch's own
# dependencies; mergelang's, which ran there: numpy, scipy, networkx, safetensors, ...) and the
# `datasets` stack (pyarrow, pandas: mergekit-yaml does not import it; gpu_check.sh checks)
KEEP_ALL="${KEEP_ALL:-}"
if [ -z "$KEEP_ALL" ]; then
    for p in numpy scipy networkx sympy mpmath filelock fsspec jinja2 markupsafe typing_extensions \
             setuptools safetensors pyyaml tqdm click huggingface_hub tokenizers pydantic pydantic_core \
             annotated_types typing_inspection packaging pyarrow pandas datasets multiprocess dill \
             xxhash tzdata python_dateutil hf_xet; do
        rm -f "$DEST"/"$p"-[0-9]*.whl
    done
fi
ls "$DEST" | sed 's/^/  /'
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST" | wc -l) wheels ($DEST)"
# mergelang's own dependencies the device image lacks (as for the first GPU run: notes/gpu-first-run.md),
# into .whl/ for gpu_check.sh's WHEELS=.whl (no dependencies resolved: the device has the rest).
# POT (32 MiB, imported only by align(method = "ot")) is left out unless WITH_POT=1: the carry
# is 64 MiB in all (.whl ~3 MiB + .whl-mergekit ~23 MiB + the tree ~7 MiB)
OWN="${OWN:-.whl}"
mkdir -p "$OWN"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$OWN" pydantic pydantic_core annotated_types \
    typing_inspection lark crc32c google-re2 ${WITH_POT:+POT}
echo "mergelang's missing dependencies: $(du -sh "$OWN" | cut -f1) in $(ls "$OWN" | wc -l) wheels ($OWN)"
