#!/usr/bin/env bash
# A multi-node load as a Ray job: the driver runs on the cluster, one actor per GPU pulls its TP shard.
# Secrets never go in the entrypoint, runtime_env or config (ray job list shows them): the config names an
# environment variable (store.password_env) that the cluster's nodes already have.
#
#   export RAY_ADDRESS=http://head-node:8265      # the cluster's dashboard (job submission) address
#   export RAY_AUTH_MODE=token                    # Ray >= 2.60 clusters with token auth
set -euo pipefail
cd "$(dirname "$0")/.."
ray job submit --working-dir . -- raydist-loader load --config configs/multinode.yaml --report /tmp/load-report.json
