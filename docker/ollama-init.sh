#!/bin/sh
# One-shot set-up of the Ollama server: pull phi4-mini and create the task variants
# phi4-mini-reasoning and phi4-mini-coder from the Modelfiles in docker/ollama/.
#
# Runs in the ollama/ollama image (compose service `ollama-init`), whose `ollama` CLI talks to
# the server named by OLLAMA_HOST. Idempotent: a pull of a present model only checks its
# digest and `ollama create` replaces a variant, so re-running it after editing a Modelfile
# is how a variant is updated.
set -eu

OLLAMA_HOST="${OLLAMA_HOST:-http://ollama:11434}"
MODELFILES_DIR="${MODELFILES_DIR:-/opt/reasonq/modelfiles}"
BASE_MODEL="phi4-mini"  # the FROM line of every Modelfile
VARIANTS="phi4-mini-reasoning phi4-mini-coder"
WAIT_S="${OLLAMA_WAIT_S:-120}"
export OLLAMA_HOST

log() { printf 'ollama-init: %s\n' "$*"; }

# compose already waits for the healthcheck; this covers a standalone run.
waited=0
until ollama list >/dev/null 2>&1; do
    if [ "$waited" -ge "$WAIT_S" ]; then
        log "no Ollama server at $OLLAMA_HOST after ${WAIT_S}s" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

for variant in $VARIANTS; do
    if [ ! -f "$MODELFILES_DIR/$variant.Modelfile" ]; then
        log "missing $MODELFILES_DIR/$variant.Modelfile" >&2
        exit 1
    fi
done

log "pulling $BASE_MODEL from $OLLAMA_HOST"
ollama pull "$BASE_MODEL"

for variant in $VARIANTS; do
    log "creating $variant"
    ollama create "$variant" -f "$MODELFILES_DIR/$variant.Modelfile"
done

ollama list
log "done"
