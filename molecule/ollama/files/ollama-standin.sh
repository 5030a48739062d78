#!/usr/bin/env bash
# TEST STAND-IN - THIS IS NOT OLLAMA. It runs no model and serves no Ollama API.
#
# Built into a throwaway archive by molecule/ollama/prepare.yml because the real release tarball
# (GitHub, ollama.com) is unreachable from the lab. It lets the scenario check what the ollama role
# does around the binary: unpack location, unit, settings drop-in, and which CLI calls it makes.
#   serve   listens on $OLLAMA_HOST and answers every request with a line naming itself a stand-in,
#           so a test can see the drop-in's settings reach the process.
#   list    prints the models "pulled" so far, in the CLI's column layout (NAME first).
#   pull M  records M as present.
# Every CLI call is appended to /var/lib/ollama-standin/calls.log (user, OLLAMA_HOST, arguments).
set -euo pipefail
state=/var/lib/ollama-standin
case ${1:-} in
    serve)
        echo "ollama test stand-in: serve on ${OLLAMA_HOST:?} (models ${OLLAMA_MODELS:-unset}, keep-alive ${OLLAMA_KEEP_ALIVE:-unset})"
        exec /usr/bin/python3 - "$OLLAMA_HOST" <<'PY'
import http.server
import sys

host, _, port = sys.argv[1].rpartition(":")


class StandIn(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ollama test stand-in, not Ollama\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.HTTPServer((host, int(port)), StandIn).serve_forever()
PY
        ;;
    list | pull)
        mkdir -p "$state"
        echo "$(id -un) OLLAMA_HOST=${OLLAMA_HOST:-unset} $*" >>"$state/calls.log"
        touch "$state/models"
        if [[ $1 == list ]]; then
            printf '%-30s %-14s %-8s %s\n' NAME ID SIZE MODIFIED
            while read -r model; do
                printf '%-30s %-14s %-8s %s\n' "$model" 0123456789ab "0 B" "stand-in"
            done <"$state/models"
        else
            model=${2:?pull needs a model}
            [[ $model == *:* ]] || model=$model:latest
            echo "$model" >>"$state/models"
            echo "stand-in: recorded $model (nothing downloaded)"
        fi
        ;;
    *)
        echo "ollama test stand-in: unsupported arguments: $*" >&2
        exit 64
        ;;
esac
