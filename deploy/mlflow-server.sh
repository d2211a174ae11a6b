#!/usr/bin/env bash
# ticketsearch-mlflow-server: start the MLflow tracking server of a ticketsearch cluster.
#
# Usage: ticketsearch-mlflow-server [--detach] [-- EXTRA `mlflow server` ARGUMENTS]
#
# Settings (environment; every *_URI, *_PASSWORD and *_KEY value may instead be given as a
# file named by the same variable with _FILE appended, e.g. a mounted secret):
#   MLFLOW_BACKEND_STORE_URI      runs and metrics: postgresql://USER:PASSWORD@HOST:5432/DB, or
#                                 sqlite:////absolute/path.db for a one-machine trial (required)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts (tickets) go, proxied through the server:
#                                 s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a path (required)
#   MLFLOW_HOST, MLFLOW_PORT      where the server listens (127.0.0.1, 5000): loopback unless
#                                 told otherwise; on a cluster's head, its private address
#                                 (what the nodes' MLFLOW_TRACKING_URI names), in a pod 0.0.0.0
#   MLFLOW_WORKERS                server processes (4)
#   MLFLOW_AUTH_DATABASE_URI      turns on MLflow's basic auth, with its users in this database;
#                                 then MLFLOW_AUTH_ADMIN_USERNAME (admin), MLFLOW_AUTH_ADMIN_PASSWORD
#                                 and MLFLOW_FLASK_SERVER_SECRET_KEY are required
#   MLFLOW_LOG, MLFLOW_PID_FILE   with --detach: the server's log and pid file
#                                 (~/mlflow-server.log, ~/mlflow-server.pid)
#
# Without --detach the script becomes the server (a container's main process). With --detach
# it starts the server in its own session, returns once /health answers (exit 1 with the log's
# tail if it does not within MLFLOW_START_TIMEOUT_S, 120 s), and does nothing if a server
# already answers on the port (so a node's setup commands can run it again).
# Secrets never appear on a command line: the server reads them from its environment.
set -euo pipefail

fail() {
  echo "ticketsearch-mlflow-server: $*" >&2
  exit 2
}

# setting NAME: $NAME if set, else the contents of the file named by ${NAME}_FILE, else "".
setting() {
  local name=$1 file_var="${1}_FILE"
  if [[ -n "${!name:-}" ]]; then
    printf '%s' "${!name}"
  elif [[ -n "${!file_var:-}" ]]; then
    [[ -s "${!file_var}" ]] || fail "${file_var}=${!file_var}: the file is missing or empty; put the value there or set ${name}"
    printf '%s' "$(<"${!file_var}")"
  fi
}

# require NAME WHAT: export NAME from `setting NAME`, or fail naming both variables.
require() {
  local value
  value=$(setting "$1")
  [[ -n "$value" ]] || fail "$1 (or $1_FILE) is not set: $2"
  export "$1=$value"
}

# check_host: where /health is asked: the listening address (loopback for "all addresses").
check_host() {
  case "${MLFLOW_HOST:-127.0.0.1}" in
    0.0.0.0 | "::") echo 127.0.0.1 ;;
    *) echo "${MLFLOW_HOST:-127.0.0.1}" ;;
  esac
}

healthy() {
  python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://$(check_host):${PORT}/health" >/dev/null 2>&1
}

# write_auth_config: MLflow's basic-auth settings in a private file; its path on stdout.
write_auth_config() {
  local folder
  folder=$(mktemp -d)
  chmod 700 "$folder"
  (umask 077 && cat >"$folder/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  )
  printf '%s' "$folder/basic_auth.ini"
}

# start_failed WHAT LOG: say what went wrong with the log's tail, and exit 1.
start_failed() {
  echo "ticketsearch-mlflow-server: $1; the last lines of $2:" >&2
  tail -n 30 "$2" >&2
  exit 1
}

start_detached() {
  local log=${MLFLOW_LOG:-$HOME/mlflow-server.log} pid_file=${MLFLOW_PID_FILE:-$HOME/mlflow-server.pid}
  local timeout=${MLFLOW_START_TIMEOUT_S:-120} pid waited=0
  if healthy; then
    echo "an MLflow server already answers on port ${PORT}; nothing to do"
    return 0
  fi
  mkdir -p "$(dirname "$log")" "$(dirname "$pid_file")"
  setsid mlflow "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      start_failed "the server (pid ${pid}) exited" "$log"
    elif ((waited >= timeout * 2)); then
      start_failed "the server (pid ${pid}) did not answer http://$(check_host):${PORT}/health within ${timeout}s" "$log"
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "MLflow server on port ${PORT} (pid ${pid}, log ${log})"
}

main() {
  local detach=0
  if [[ "${1:-}" == "--detach" ]]; then
    detach=1
    shift
  fi
  if [[ "${1:-}" == "--" ]]; then
    shift
  elif [[ $# -gt 0 ]]; then
    fail "unknown argument $1; usage: ticketsearch-mlflow-server [--detach] [-- MLFLOW SERVER ARGS]"
  fi
  PORT=${MLFLOW_PORT:-5000}
  require MLFLOW_BACKEND_STORE_URI "the database of runs and metrics (postgresql://... or sqlite:////path.db)"
  require MLFLOW_ARTIFACTS_DESTINATION "the bucket the artifacts go to (s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)"
  # MLflow's background job runner serves GenAI features only and slows the start.
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
  local args=(server --host "${MLFLOW_HOST:-127.0.0.1}" --port "$PORT" --workers "${MLFLOW_WORKERS:-4}")
  if [[ -n "$(setting MLFLOW_AUTH_DATABASE_URI)" ]]; then
    require MLFLOW_AUTH_DATABASE_URI "the database of MLflow's users"
    require MLFLOW_AUTH_ADMIN_PASSWORD "the password of the admin user (basic auth is on)"
    require MLFLOW_FLASK_SERVER_SECRET_KEY "a random key shared by the server's processes (basic auth is on)"
    export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
    MLFLOW_AUTH_CONFIG_PATH=$(write_auth_config)
    export MLFLOW_AUTH_CONFIG_PATH
    args+=(--app-name basic-auth)
  fi
  args+=("$@")
  if ((detach)); then
    start_detached "${args[@]}"
  else
    exec mlflow "${args[@]}"
  fi
}

main "$@"
