#!/usr/bin/env bash
# Writes prometheusrule.yaml, the prometheus-operator PrometheusRule, from
# mdcluster.rules.yml (the plain Prometheus rule file, the one to edit): the same groups
# under `spec:`. With --check, writes nothing and fails if prometheusrule.yaml is not what
# it would write (CI: tests/tests/t92_alert_rules.rs).
# Usage: deploy/monitoring/generate.sh [--check]
set -euo pipefail
cd "$(dirname "$0")"

render() {
    cat <<'HEAD'
# Generated from mdcluster.rules.yml by generate.sh: edit that file, then run generate.sh.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: mdcluster
  labels:
    app.kubernetes.io/name: mdcluster
    # Prometheus loads the PrometheusRules its ruleSelector matches: these two labels
    # follow the kube-prometheus convention; set what yours selects (kube-prometheus-stack:
    # `release: <its Helm release>`) in an overlay.
    prometheus: k8s
    role: alert-rules
spec:
HEAD
    # The rule file without its top-level comments, indented under spec.
    sed -e '/^#/d' -e 's/^\(.\)/  \1/' mdcluster.rules.yml
}

case "${1:-}" in
    --check)
        if ! diff -u prometheusrule.yaml <(render); then
            echo "generate: prometheusrule.yaml is stale: run deploy/monitoring/generate.sh" >&2
            exit 1
        fi
        echo "generate: prometheusrule.yaml is current"
        ;;
    "")
        render >prometheusrule.yaml
        echo "generate: wrote prometheusrule.yaml"
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
