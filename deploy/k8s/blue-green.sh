#!/usr/bin/env bash
# Blue/green for a new model export: start the idle track, prove it generates,
# then point the live Service at it. The old track stays up for instant rollback.
#   deploy/k8s/blue-green.sh green registry.example.com/llm-triton:green
set -euo pipefail
track=${1:?track: blue or green}; image=${2:?image}
model=${MODEL_NAME:-smollm2-135m-instruct}
sed -e "s/blue/${track}/g" -e "s#registry.example.com/llm-triton:${track}#${image}#" \
    "$(dirname "$0")/triton.yaml" | kubectl apply -f - -l "track=${track}"
kubectl rollout status "deployment/llm-triton-${track}" --timeout=15m
# Validation: a real generation through the new track, not just readiness.
# Triton's generate endpoint answers with the model's JSON (text_output, finish_reason).
kubectl run "validate-${track}-$RANDOM" --rm -i --restart=Never --image=curlimages/curl -- \
  curl -fsS -X POST "http://llm-triton-${track}:8000/v2/models/${model}/generate" \
    -d '{"text_input": "The capital of France is", "max_tokens": 4, "temperature": 0}' \
  | grep -q '"text_output"' || { echo "validation failed: ${track} does not generate" >&2; exit 1; }
kubectl patch service llm-triton -p "{\"spec\":{\"selector\":{\"app\":\"llm-triton\",\"track\":\"${track}\"}}}"
echo "live track is now ${track}; roll back with: kubectl patch service llm-triton -p '{\"spec\":{\"selector\":{\"app\":\"llm-triton\",\"track\":\"<old>\"}}}'"
