#!/usr/bin/env bash
# Install or upgrade the pcp shepherd agent on the head-node Mac, as a launchd daemon.
#
#   sudo infra/bootstrap/shepherd/install.sh --stack tiny --project my-project \
#       --key ./pcp-tiny-shepherd-key.json [--source PATH] [--python PYTHON]
#
# Creates /opt/pcp/venv, installs pcp into it (from this checkout unless --source names another
# checkout, sdist or wheel), puts the service account key at /etc/pcp/shepherd-key.json (mode
# 600), installs /Library/LaunchDaemons/dev.pcp.shepherd.plist and bootstraps it. Re-running it
# upgrades in place; it restarts the agent, which stops a binary that is running, so upgrade
# between runs. See docs/agent.md.
set -euo pipefail
shopt -s inherit_errexit

readonly LABEL=dev.pcp.shepherd
readonly PCP=/opt/pcp
readonly VENV=$PCP/venv
readonly KEY=/etc/pcp/shepherd-key.json
readonly LOGS=/var/log/pcp
readonly PLIST=/Library/LaunchDaemons/$LABEL.plist
readonly STACK_RE='^[a-z][a-z0-9-]{0,29}$'
readonly PROJECT_RE='^[a-z][a-z0-9-]{4,28}[a-z0-9]$'
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE

log() { printf 'pcp-install: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# The first Python 3.11+ among $1 (if given) and the usual places; its path on stdout.
find_python() {
  local candidate
  for candidate in "$@" python3.13 python3.12 python3.11 /opt/homebrew/bin/python3 \
    /usr/local/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# The plist template with the stack and project filled in; both are checked first, so the
# substitution can only ever insert [a-z0-9-].
render_plist() {
  local template=$1 stack=$2 project=$3
  [[ $stack =~ $STACK_RE ]] || die "stack $stack must match $STACK_RE"
  [[ $project =~ $PROJECT_RE ]] || die "project $project must match $PROJECT_RE"
  sed -e "s/@STACK@/$stack/g" -e "s/@PROJECT@/$project/g" "$template"
}

# Wait until launchd has let go of the old agent (it writes done first; up to ExitTimeOut).
wait_unloaded() {
  local i
  for ((i = 0; i < 120; i++)); do
    launchctl print "system/$LABEL" >/dev/null 2>&1 || return 0
    sleep 1
  done
  die "the old agent did not stop within 120 s"
}

main() {
  local stack="" project="" key="" source="" python=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --stack) stack=${2:?--stack needs a value}; shift 2 ;;
      --project) project=${2:?--project needs a value}; shift 2 ;;
      --key) key=${2:?--key needs a file}; shift 2 ;;
      --source) source=${2:?--source needs a path}; shift 2 ;;
      --python) python=${2:?--python needs a command}; shift 2 ;;
      -h | --help) usage ;;
      *) log "unknown argument: $1"; usage ;;
    esac
  done
  [[ -n $stack && -n $project ]] || usage
  [[ $(uname -s) == Darwin ]] || die "this installs a launchd daemon: run it on the Mac"
  [[ $EUID -eq 0 ]] || die "run it with sudo (it writes /opt/pcp and /Library/LaunchDaemons)"
  source=${source:-$(cd "$HERE/../../.." && pwd)}
  local rendered
  rendered=$(render_plist "$HERE/$LABEL.plist" "$stack" "$project")

  if [[ -n $key ]]; then
    [[ -f $key ]] || die "no key file at $key"
    install -d -m 700 -o root -g wheel "$(dirname "$KEY")"
    install -m 600 -o root -g wheel "$key" "$KEY"
    log "service account key installed at $KEY"
  fi
  [[ -f $KEY ]] || die "no credentials at $KEY: pass --key (a service account key or a workload identity federation credential file)"

  local py
  py=$(find_python "$python") || die "no Python 3.11+ found: install one (e.g. brew install python@3.12) or pass --python"
  install -d -m 755 "$PCP" "$PCP/work" "$LOGS"
  if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  log "installing pcp from $source"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --upgrade "$source"
  "$VENV/bin/python" -c 'import pcp.agent'
  if ! command -v nix >/dev/null 2>&1 && [[ ! -x /nix/var/nix/profiles/default/bin/nix ]]; then
    log "warning: Nix is not installed; flake and store-path binaries will fail (docs/agent.md)"
  fi

  # Logs rotate with newsyslog: 7 files of at most 50 MB, compressed.
  printf '%s\n' "$LOGS/*.log  root:wheel  644  7  51200  *  GNZ" >/etc/newsyslog.d/pcp.conf

  if launchctl print "system/$LABEL" >/dev/null 2>&1; then
    log "stopping the running agent (it stops its binary and writes done)"
    launchctl bootout "system/$LABEL" || true
    wait_unloaded
  fi
  printf '%s\n' "$rendered" >"$PLIST.new"
  plutil -lint "$PLIST.new" >/dev/null
  chown root:wheel "$PLIST.new"
  chmod 644 "$PLIST.new"
  mv "$PLIST.new" "$PLIST"
  launchctl enable "system/$LABEL"
  launchctl bootstrap system "$PLIST"
  log "installed: launchctl print system/$LABEL; logs in $LOGS/shepherd.log"
}

# Run when executed; sourcing only defines the functions (the tests render the plist).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
