#!/usr/bin/env bash
# Run one llm-deploy command in the cluster as a Job (jobs/llm-deploy.yaml), show its
# output and exit with its exit code (0 done; 2 bad usage or set-up, nothing changed;
# 3 the candidate failed validation, traffic untouched; 4 a server failed or timed out).
#   deploy/k8s/llm-deploy.sh promote smollm2-135m-instruct            newest version on disk
#   deploy/k8s/llm-deploy.sh promote NAME --canary 10                 10% of new requests
#   deploy/k8s/llm-deploy.sh promote NAME --finish                    the canary takes all
#   deploy/k8s/llm-deploy.sh rollback NAME | status NAME | retire NAME
# Environment: NAMESPACE (llm), IMAGE (the adapter image of your registry), KUBECTL.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,9p' "$0" >&2; exit 2; fi
here=$(cd "$(dirname "$0")" && pwd)
ns=${NAMESPACE:-llm}
kubectl=${KUBECTL:-kubectl}

# the arguments as a YAML flow sequence of double-quoted strings
args="["
for a in "$@"; do
  a=${a//\\/\\\\}; a=${a//\"/\\\"}
  args+="\"$a\", "
done
args="${args%, }]"

manifest=$(sed -e "s|args: \[\"ARGS\"\]|args: ${args}|" "$here/jobs/llm-deploy.yaml")
if [ -n "${IMAGE:-}" ]; then
  manifest=$(printf '%s\n' "$manifest" | sed -e "s|image: registry.example.com/openai-adapter:0.1.0|image: ${IMAGE}|")
fi
job=$(printf '%s\n' "$manifest" | $kubectl -n "$ns" create -f - -o name)
echo "${job}: llm-deploy $*" >&2

while :; do
  state=$($kubectl -n "$ns" get "$job" -o 'jsonpath={.status.succeeded}/{.status.failed}')
  case $state in
    1/*) break ;;
    */[1-9]*) break ;;
  esac
  sleep 5
done
$kubectl -n "$ns" logs "$job" --all-containers=true || true
code=$($kubectl -n "$ns" get pods -l "job-name=${job#*/}" \
  -o 'jsonpath={.items[0].status.containerStatuses[0].state.terminated.exitCode}')
exit "${code:-1}"
