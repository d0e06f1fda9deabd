#!/bin/sh
# Install or upgrade the pcp shepherd agent on the head-node Mac, as a launchd daemon.
#
#   sudo sh infra/bootstrap/shepherd/install.sh --stack tiny --project my-project \
#       [--key ./pcp-tiny-shepherd-key.json] [--source PATH] [--python PYTHON]
#
# Creates /opt/pcp/venv and installs the agent into it: `--source` names the agent sdist (what
# `pcp shepherd install` copies here) or a checkout of pcp, installed with its `agent` extra;
# the default is the checkout holding this script. Puts the credential file at
# /etc/pcp/shepherd-key.json (mode 600), installs /Library/LaunchDaemons/dev.pcp.shepherd.plist
# and bootstraps it. Re-running it upgrades in place; it restarts the agent, which stops a
# binary that is running, so upgrade between runs. See docs/agent.md.
#
# POSIX sh: macOS runs it with /bin/sh (bash 3.2 in POSIX mode); the tests run it under dash
# and check it with `shellcheck -s sh`. PCP_INSTALL_ROOT, for the tests only, is prefixed to
# every path this script writes (the installed plist still names the real paths).
set -eu

LABEL=dev.pcp.shepherd
ROOT=${PCP_INSTALL_ROOT:-}
PCP=$ROOT/opt/pcp
VENV=$PCP/venv
KEY_DIR=$ROOT/etc/pcp
KEY=$KEY_DIR/shepherd-key.json
LOGS=$ROOT/var/log/pcp
PLIST=$ROOT/Library/LaunchDaemons/$LABEL.plist
NEWSYSLOG=$ROOT/etc/newsyslog.d/pcp.conf
# The same patterns as pcp/core/names.py (STACK_RE) and the Pulumi program's project check.
STACK_RE='^[a-z][a-z0-9]{0,11}$'
PROJECT_RE='^[a-z][a-z0-9-]{4,28}[a-z0-9]$'
NL='
'
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf 'pcp-install: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

# True when $1 is one line matching the extended regular expression $2.
matches() {
  case $1 in *"$NL"*) return 1 ;; esac
  printf '%s\n' "$1" | grep -Eq -- "$2"
}

# The first Python 3.11+ among $1 (if given) and the usual places; its path on stdout.
find_python() {
  for candidate in "$@" python3.13 python3.12 python3.11 /opt/homebrew/bin/python3 \
    /usr/local/bin/python3 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# The plist template with the stack and project filled in; main checks both first, so the
# substitution can only ever insert [a-z0-9-].
render_plist() {
  sed -e "s/@STACK@/$2/g" -e "s/@PROJECT@/$3/g" "$1"
}

# What pip installs: an archive as it is (the agent sdist depends on the agent extra's
# packages), a checkout with its `agent` extra.
pip_spec() {
  if [ -d "$1" ]; then
    printf '%s[agent]\n' "$(cd "$1" && pwd)"
  else
    printf '%s\n' "$1"
  fi
}

# Wait until launchd has let go of the old agent (it writes done first; up to ExitTimeOut).
wait_unloaded() {
  i=0
  while [ "$i" -lt 120 ]; do
    launchctl print "system/$LABEL" >/dev/null 2>&1 || return 0
    sleep 1
    i=$((i + 1))
  done
  die "the old agent did not stop within 120 s"
}

# Owner root:wheel and mode $1 for the paths that follow.
own() {
  mode=$1
  shift
  chown root:wheel "$@"
  chmod "$mode" "$@"
}

main() {
  stack="" project="" key="" source="" python=""
  while [ "$#" -gt 0 ]; do
    case $1 in
      --stack | --project | --key | --source | --python)
        [ "$#" -ge 2 ] || die "$1 needs a value"
        case $1 in
          --stack) stack=$2 ;;
          --project) project=$2 ;;
          --key) key=$2 ;;
          --source) source=$2 ;;
          --python) python=$2 ;;
        esac
        shift 2
        ;;
      -h | --help) usage ;;
      *)
        log "unknown argument: $1"
        usage
        ;;
    esac
  done
  if [ -z "$stack" ] || [ -z "$project" ]; then usage; fi
  matches "$stack" "$STACK_RE" || die "stack $stack must match $STACK_RE"
  matches "$project" "$PROJECT_RE" || die "project $project must match $PROJECT_RE"
  [ "$(uname -s)" = Darwin ] || die "this installs a launchd daemon: run it on the Mac"
  [ "$(id -u)" -eq 0 ] || die "run it with sudo (it writes /opt/pcp and /Library/LaunchDaemons)"
  source=${source:-$(cd "$HERE/../../.." && pwd)}
  [ -e "$source" ] || die "no agent to install at $source"
  rendered=$(render_plist "$HERE/$LABEL.plist" "$stack" "$project")

  if [ -n "$key" ]; then
    [ -f "$key" ] || die "no key file at $key"
    mkdir -p "$KEY_DIR"
    own 700 "$KEY_DIR"
    (umask 077 && cp "$key" "$KEY.new")
    own 600 "$KEY.new"
    mv "$KEY.new" "$KEY"
    log "credentials installed at $KEY"
  fi
  [ -f "$KEY" ] || die "no credentials at $KEY: pass --key (a service account key or a workload identity federation credential file)"

  py=$(find_python "$python") || die "no Python 3.11+ found: install one (e.g. brew install python@3.12) or pass --python"
  mkdir -p "$PCP/work" "$LOGS"
  chmod 755 "$PCP" "$PCP/work" "$LOGS"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  spec=$(pip_spec "$source")
  log "installing $spec"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --upgrade "$spec"
  "$VENV/bin/python" -c 'import pcp.agent'
  if ! command -v nix >/dev/null 2>&1 && [ ! -x /nix/var/nix/profiles/default/bin/nix ]; then
    log "warning: Nix is not installed; flake and store-path binaries will fail (docs/agent.md)"
  fi

  # launchd's own capture of the daemon's output, written to only until the agent has opened
  # its own log (an interpreter that cannot start, say). launchd reopens it at every spawn,
  # so newsyslog may rotate it without a signal (N).
  mkdir -p "$(dirname "$NEWSYSLOG")"
  printf '%s\n' "/var/log/pcp/launchd.log  root:wheel  644  3  1024  *  NZ" >"$NEWSYSLOG.new"
  mv "$NEWSYSLOG.new" "$NEWSYSLOG"

  if launchctl print "system/$LABEL" >/dev/null 2>&1; then
    log "stopping the running agent (it stops its binary and writes done)"
    launchctl bootout "system/$LABEL" || true
    wait_unloaded
  fi
  mkdir -p "$(dirname "$PLIST")"
  printf '%s\n' "$rendered" >"$PLIST.new"
  plutil -lint "$PLIST.new" >/dev/null
  own 644 "$PLIST.new"
  mv "$PLIST.new" "$PLIST"
  launchctl enable "system/$LABEL"
  launchctl bootstrap system "$PLIST"
  log "installed: launchctl print system/$LABEL; logs in /var/log/pcp/shepherd.log"
}

main "$@"
