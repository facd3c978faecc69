#!/usr/bin/env bash
# Fill what benchmarks/gpu_evidence.sh needs beside the repository on a device machine that cannot
# reach the network. Run it here (where pip reaches PyPI), in the checkout whose tree the device tool
# sends (the tool sends the checkout the session was started in, not a helper's worktree):
#
#   bash benchmarks/gpu_prepare.sh            # PYTHON=... to use another python for pip
#
# It writes two ignored folders, each to be named in the device call's `carry`:
#   benchmarks/wheels/    MONAI, nibabel and SimpleITK: the packages medssm needs that the device
#                         image lacks (its package list in /work/.library/device/KINDS.md has PyTorch,
#                         Triton, numba, scipy, scikit-image, pillow, matplotlib, safetensors, tqdm,
#                         scikit-learn, typing-extensions and packaging, but not these three). Wheels for
#                         CPython 3.12 on x86-64 Linux (the image's python3), dependencies not fetched.
#                         SimpleITK's wheel (53 MB, one 272 MB library) is repacked with LZMA
#                         compression (about 29 MB, same files and RECORD, pip installs it as usual),
#                         so that wheels, data and repository stay under the tool's 64 MiB a call.
#   benchmarks/gpu_data/  a copy of $MEDSSM_DATA/Dataset001_LungXray (17 MB), checked against
#                         $MEDSSM_DATA/SHA256SUMS: the ../shared folder beside a checkout does not
#                         travel, so the data must be inside the tree.
# At the end it prints the size of what a call would send. Running it again reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=benchmarks/wheels
data=${MEDSSM_DATA:-/work/shared/data}
mkdir -p "$wheels" benchmarks/gpu_data
rm -f "$wheels"/*.tmp  # an interrupted repack's leftover would travel too

# 1. The wheels (the versions of this project's development environment).
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$wheels" monai==1.6.1 nibabel==5.4.2 simpleitk==2.5.7

# 2. SimpleITK repacked with LZMA (a few minutes of one core, once).
"$py" - "$wheels"/simpleitk-*.whl <<'PY'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    if all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist() if i.file_size > 1 << 20):
        print(f"{path}: already LZMA ({os.path.getsize(path) / 1e6:.1f} MB)")
        sys.exit(0)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as out:
        for info in z.infolist():  # same names, dates and order; only the compression changes
            out.writestr(info, z.read(info), compress_type=zipfile.ZIP_LZMA)
before = os.path.getsize(path)
os.replace(tmp, path)
print(f"{path}: repacked with LZMA, {before / 1e6:.1f} MB -> {os.path.getsize(path) / 1e6:.1f} MB")
PY

# 3. The lung X-rays, checked.
if [[ ! -f benchmarks/gpu_data/Dataset001_LungXray/dataset.json ]]; then
    cp -r "$data/Dataset001_LungXray" benchmarks/gpu_data/
fi
(cd benchmarks/gpu_data && grep ' Dataset001_LungXray/' "$data/SHA256SUMS" | sha256sum -c --quiet -) \
    && echo "benchmarks/gpu_data/Dataset001_LungXray: $(ls benchmarks/gpu_data/Dataset001_LungXray/imagesTr | wc -l) images, checksums match"

# 4. What a device call would send: tracked and untracked-not-ignored files, and the two carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb "$wheels" benchmarks/gpu_data | tail -1 | cut -f1)
echo "a call sends $(( (tree + carried) / 1048576 )) MiB (tree $(( tree / 1048576 )), carried $(( carried / 1048576 ))); the limit is 64 MiB"
ls -l "$wheels"
