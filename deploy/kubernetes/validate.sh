#!/usr/bin/env bash
# Offline checks of deploy/kubernetes (CI runs it through tests/tests/t60_deploy_manifests.rs):
#  1. every *.yaml here is listed in kustomization.yaml and every listed file exists;
#  2. every object validates, strictly (no unknown field), against the Kubernetes
#     OpenAPI schemas bundled in the PyPI package `kubernetes-validate` (no network);
#  3. the pods' `checksum/config` annotation is the sha256 of the ConfigMap's data, so a
#     config change cannot forget to roll the pods (`validate.sh --fix` rewrites it).
#  4. if kubectl is installed, `kubectl kustomize` renders and the result validates too.
# Usage: deploy/kubernetes/validate.sh [--fix]   (env: K8S_VERSION, default 1.30.0)
set -euo pipefail
cd "$(dirname "$0")"
K8S_VERSION=${K8S_VERSION:-1.30.0}
# The validator, run as a module of the python3 it was installed for.
KV=(python3 -m kubernetes_validate --strict --no-warn -k "$K8S_VERSION")
python3 -c 'import kubernetes_validate' 2>/dev/null || {
    echo "validate: kubernetes-validate is not installed (pip install kubernetes-validate)" >&2
    exit 2
}

python3 - "${1:-}" <<'PY'
import glob, hashlib, json, sys, yaml
fix = sys.argv[1] == "--fix"
k = yaml.safe_load(open("kustomization.yaml"))
listed = set(k["resources"])
files = set(glob.glob("*.yaml")) - {"kustomization.yaml"}
if listed != files:
    sys.exit(f"validate: kustomization.yaml resources {sorted(listed)} != files {sorted(files)}")
cm = yaml.safe_load(open("configmap.yaml"))
data = json.dumps(cm["data"], sort_keys=True, separators=(",", ":"))
want = hashlib.sha256(data.encode()).hexdigest()
bad = 0
for f in ("mdserver.yaml", "mdagent.yaml"):
    text = open(f).read()
    for doc in yaml.safe_load_all(text):
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        have = doc["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        if have != want:
            if fix:
                open(f, "w").write(text.replace(have, want))
                print(f"validate: {f}: checksum/config set to {want}")
            else:
                print(f"validate: {f}: checksum/config {have} != {want} (run validate.sh --fix)")
                bad = 1
sys.exit(bad)
PY

# shellcheck disable=SC2046 # the file list has no spaces
"${KV[@]}" $(python3 -c \
    'import yaml; print(" ".join(yaml.safe_load(open("kustomization.yaml"))["resources"]))')

if command -v kubectl >/dev/null; then
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    kubectl kustomize . >"$out"
    "${KV[@]}" "$out"
    echo "validate: kubectl kustomize output valid"
fi
echo "validate: OK (Kubernetes $K8S_VERSION schemas)"
