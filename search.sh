#!/usr/bin/env bash
# The whole pipeline: profile -> solve -> plan.json -> apply -> evaluate.
# Every option is passed to `python -m bitalloc.pipeline`; see `bash search.sh --help`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${BITALLOC_DATA:-}" && -d "$here/../shared/data" ]]; then
  export BITALLOC_DATA="$here/../shared/data"
fi
exec python -m bitalloc.pipeline --space-dir "$here/search/spaces" "$@"
