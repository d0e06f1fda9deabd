#!/usr/bin/env bash
# pcp worker VM startup script: the `startup-script` metadata of every worker VM, run as root by
# the guest environment at EVERY boot of the persistent VM (see docs/agent.md).
#
# Idempotent: Nix, the tools, Python and the venv are installed once and stay on the persistent
# disk; the agent is reinstalled only when its object in the bucket changed; then the agent
# service is started. Nothing read from metadata is evaluated by the shell: each value is
# checked against a pattern and always quoted. If anything fails and no agent can run, the VM
# powers itself off rather than idle (the dead-man's switch cannot run without the agent).
set -euo pipefail
shopt -s inherit_errexit  # so a failure inside $(...) fails the assignment too

# GCE_METADATA_HOST is honoured as the Google libraries and the agent honour it (tests use it).
readonly MD=http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1
readonly PCP=/opt/pcp
readonly VENV=$PCP/venv
readonly NIX_BIN=/nix/var/nix/profiles/default/bin
readonly TOOLS=/nix/var/nix/profiles/pcp-tools
readonly UNIT=/etc/systemd/system/pcp-agent.service
readonly ETC_NIX=/etc/nix
readonly NIX_CONF=$ETC_NIX/nix.conf
readonly AGENT_OBJECT=agent%2Fpcp-agent.tar.gz  # gs://<bucket>/agent/pcp-agent.tar.gz, URL-encoded
# Written once a bootstrap has run to the end; until then every boot is the first boot.
readonly BOOTSTRAPPED=$PCP/bootstrap.done

log() { printf 'pcp-bootstrap: %s\n' "$*" >&2; }
die() { log "$*"; return 1; }

# One instance attribute, or nothing when it is not set (curl -f fails on the 404).
attr() {
  curl -fsS --retry 5 --retry-connrefused --max-time 10 \
    -H 'Metadata-Flavor: Google' "$MD/instance/attributes/$1" 2>/dev/null || true
}

# Attribute $1 if it matches the pattern $2, nothing if unset; a malformed value is an error.
checked_attr() {
  local value
  value=$(attr "$1")
  if [[ -n $value && ! $value =~ $2 ]]; then
    die "metadata $1 does not match $2; refusing to use it" || return 1
  fi
  printf '%s' "$value"
}

# Field $1 of the JSON object on stdin (the venv's Python; the image's is too old to trust).
json_field() {
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

on_exit() {
  local status=$?
  [[ $status -eq 0 ]] && return 0
  set +e
  log "bootstrap failed (exit status $status)"
  if [[ -f $UNIT ]] && "$VENV/bin/python" -c 'import pcp.agent' 2>/dev/null; then
    log "starting the agent installed at an earlier boot"
    systemctl daemon-reload
    systemctl start pcp-agent.service
  else
    log "no agent can run on this VM: powering off rather than idling"
    shutdown -h now
  fi
}

install_nix() {
  if [[ -x $NIX_BIN/nix ]]; then
    log "Nix is installed: skipping"
    return 0
  fi
  # Choice: the official upstream installer, multi-user (daemon) mode. It is the reference
  # install and needs no extra tool; NIX_INSTALLER_YES answers its prompts. Pin a version
  # with the pcp-nix-installer-url metadata, e.g. https://releases.nixos.org/nix/nix-X.Y.Z/install
  local url installer
  url=$(checked_attr pcp-nix-installer-url '^https://[A-Za-z0-9./_~+-]+$')
  url=${url:-https://nixos.org/nix/install}
  installer=$(mktemp)
  log "installing Nix from $url (first boot only)"
  curl -fsSL --retry 5 --proto '=https' --tlsv1.2 -o "$installer" "$url"
  NIX_INSTALLER_YES=1 sh "$installer" --daemon --no-channel-add
  rm -f "$installer"
}

install_tools() {
  if [[ -x $TOOLS/bin/cachix && -x $TOOLS/bin/uv ]]; then
    log "cachix and uv are installed: skipping"
    return 0
  fi
  log "installing cachix and uv into $TOOLS (first boot only)"
  "$NIX_BIN/nix" --extra-experimental-features 'nix-command flakes' \
    profile install --profile "$TOOLS" nixpkgs#cachix nixpkgs#uv
}

# The Nix settings of a worker, as pcp.conf (docs/agent.md, "Nix on a worker"). Plain numbers
# only: Nix 2.8 refuses size suffixes such as 15G. Metadata is checked before it gets here.
#   $1 substituter URL (may be empty), $2 its public key (may be empty)
nix_settings() {
  local substituter=$1 key=$2
  echo '# Written by the pcp worker startup script at every boot; edits are lost.'
  # extra-: adds to what the installer or the image enabled instead of replacing it.
  echo 'extra-experimental-features = nix-command flakes'
  if [[ -n $substituter ]]; then
    echo "extra-substituters = $substituter"
  fi
  if [[ -n $key ]]; then
    echo "extra-trusted-public-keys = $key"
  fi
  # A miss is not remembered: the agent asks once per run, and a binary pushed after a first
  # miss must be found by the next run, not an hour later (the default is 3600 s).
  echo 'narinfo-cache-negative-ttl = 0'
  # The worker never builds: a binary missing from the cache, or refused because its
  # signature does not match, fails the run at once with Nix's reason in stderr.log instead of
  # a silent local build on a GPU VM. always-allow-substitutes (later Nix releases; 2.8 warns
  # and ignores it) lets wrappers marked allowSubstitutes = false come from the cache too.
  echo 'max-jobs = 0'
  echo 'always-allow-substitutes = true'
  # Garbage collection on the 100 GB boot disk: when free space falls below 15 GiB while Nix
  # substitutes, it deletes unreferenced store paths (older binaries) until 30 GiB are free.
  echo 'min-free = 16106127360'
  echo 'max-free = 32212254720'
}

# Write $1/pcp.conf from the metadata and include it from $1/nix.conf: /etc/nix on the VM; the
# tests render it into a directory of their own (Nix reads $NIX_CONF_DIR/nix.conf).
write_nix_config() {
  local dir=$1 cache substituter key
  cache=$(checked_attr pcp-cachix-cache '^[a-z0-9][a-z0-9-]{0,62}$')
  substituter=$(checked_attr pcp-nix-substituter '^https?://[A-Za-z0-9.:/_~+-]+$')
  key=$(checked_attr pcp-cachix-public-key '^[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}$')
  if [[ -z $substituter && -n $cache ]]; then
    substituter=https://$cache.cachix.org
  fi
  if [[ -n $substituter && -z $key && -z $cache ]]; then
    log "pcp-nix-substituter is set without pcp-cachix-public-key: Nix will refuse its paths"
  fi
  nix_settings "$substituter" "$key" >"$dir/pcp.conf.new"
  mv "$dir/pcp.conf.new" "$dir/pcp.conf"
  touch "$dir/nix.conf"
  if ! grep -qxF "!include $dir/pcp.conf" "$dir/nix.conf"; then
    printf '!include %s\n' "$dir/pcp.conf" >>"$dir/nix.conf"
  fi
}

configure_nix() {
  local cache key
  cache=$(checked_attr pcp-cachix-cache '^[a-z0-9][a-z0-9-]{0,62}$')
  key=$(checked_attr pcp-cachix-public-key '^[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}$')
  if [[ -n $cache && -z $key ]] && ! grep -qF "$cache.cachix.org" "$NIX_CONF"; then
    log "asking Cachix for the public key of cache $cache"
    "$TOOLS/bin/cachix" use "$cache" --mode root-nixconf
  fi
  write_nix_config "$ETC_NIX"
  systemctl restart nix-daemon.service
}

install_python() {
  if [[ -x $VENV/bin/python ]]; then
    log "the agent's venv exists: skipping"
    return 0
  fi
  # The agent needs Python 3.11+, which the GPU boot images do not ship. uv brings a standalone
  # CPython that (unlike Nix's) loads the manylinux wheels of the Google client libraries.
  log "creating $VENV with Python 3.11 (first boot only)"
  UV_PYTHON_INSTALL_DIR=$PCP/python "$TOOLS/bin/uv" venv \
    --python 3.11 --python-preference only-managed "$VENV"
}

install_agent() {
  local bucket=$1 dir url generation
  dir=$(mktemp -d)
  url="https://storage.googleapis.com/storage/v1/b/$bucket/o/$AGENT_OBJECT"
  # The token goes in a private header file, not on a command line other users could see.
  (
    umask 077
    curl -fsS --retry 5 -H 'Metadata-Flavor: Google' \
      "$MD/instance/service-accounts/default/token" | json_field access_token |
      sed 's/^/Authorization: Bearer /' >"$dir/auth"
  )
  generation=$(curl -fsS --retry 5 -H @"$dir/auth" "$url?fields=generation" |
    json_field generation)
  [[ $generation =~ ^[0-9]+$ ]] || die "unexpected generation for the agent object"
  if [[ -f $PCP/agent.generation && $(<"$PCP/agent.generation") == "$generation" ]] &&
    "$VENV/bin/python" -c 'import pcp.agent' 2>/dev/null; then
    log "agent generation $generation is installed: skipping"
  else
    log "installing the agent from gs://$bucket/agent/pcp-agent.tar.gz (generation $generation)"
    curl -fsS --retry 5 -H @"$dir/auth" -o "$dir/pcp-agent.tar.gz" \
      "$url?alt=media&generation=$generation"
    "$TOOLS/bin/uv" pip install --python "$VENV/bin/python" --reinstall-package pcp \
      "$dir/pcp-agent.tar.gz"
    printf '%s\n' "$generation" >"$PCP/agent.generation"
  fi
  rm -rf "$dir"
}

install_unit() {
  # A copy of infra/bootstrap/pcp-agent.service (tests/agent/test_bootstrap.py keeps them equal).
  cat >"$UNIT.new" <<'UNIT'
# pcp node agent on a worker VM. Installed and started by worker-startup.sh at every boot; not
# enabled on its own, so a boot never starts an agent the startup script has not checked first.
# See docs/agent.md.
[Unit]
Description=pcp node agent (this worker's part of a training run, then power-off)
Wants=network-online.target
After=network-online.target nix-daemon.service

[Service]
Type=simple
ExecStart=/opt/pcp/venv/bin/python -m pcp.agent worker --work-dir /opt/pcp/work --socket-ifname auto
Environment=PYTHONUNBUFFERED=1
# The agent powers the VM off itself when its work is done; systemd must not bring it back.
Restart=no
# On stop (a VM stop, or systemctl stop) SIGTERM goes to the agent alone; it forwards it to
# the binary's process group, waits its grace (10 s), uploads the logs and writes done. Only
# what is left after TimeoutStopSec is killed, the binary's group included.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=90
StandardOutput=journal
StandardError=journal
SyslogIdentifier=pcp-agent
UNIT
  mv "$UNIT.new" "$UNIT"
  systemctl daemon-reload
}

# After a complete bootstrap: record it in $1 and print what to do now. The first boot of a
# VM (created RUNNING by `pulumi up`, or an earlier first boot that was interrupted) with no
# run waiting ends with a power-off: nothing needs the VM, and the sweeper leaves a VM in its
# first boot alone for a while (pcp:first_boot_grace_minutes) so the bootstrap is not cut
# short. Prints "poweroff" then, "start" otherwise (the agent checks the assignment itself).
after_bootstrap() {
  local marker=$1 first=0
  [[ -f $marker ]] || first=1
  date -u +%Y-%m-%dT%H:%M:%SZ >"$marker.new"
  mv "$marker.new" "$marker"
  if ((first)) && [[ -z $(attr pcp-assignment) ]]; then
    echo poweroff
  else
    echo start
  fi
}

start_agent() {
  # A running agent is never restarted: that would kill the binary of a run in progress.
  if systemctl is-active --quiet pcp-agent.service; then
    log "the agent is already running: left alone"
    return 0
  fi
  systemctl reset-failed pcp-agent.service 2>/dev/null || true
  systemctl start pcp-agent.service
  log "the agent is started"
}

# Nix-built CUDA programs look for the driver's libraries (libcuda, libnvidia-*) under
# /run/opengl-driver/lib, as on NixOS; a Debian image keeps them on the linker's path. Link
# them there (a tmpfs: again at every boot). No driver (no GPU): nothing to do.
# $1: the directory to link into (the default is what Nix programs look for).
link_gpu_driver() {
  local target=${1:-/run/opengl-driver/lib} cuda dir lib
  cuda=$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 / {print $NF; exit}')
  if [[ -z $cuda ]]; then
    return 0
  fi
  dir=$(dirname "$(readlink -f "$cuda")")
  mkdir -p "$target"
  for lib in "$dir"/libcuda.so* "$dir"/libnvidia*.so*; do
    if [[ -e $lib ]]; then
      ln -sfn "$lib" "$target/"
    fi
  done
  log "linked the NVIDIA driver libraries of $dir into $target"
}

main() {
  export HOME=${HOME:-/root} USER=${USER:-root}  # the Nix installer needs both
  exec 9>/run/pcp-bootstrap.lock
  flock -n 9 || die "another bootstrap is running"
  trap on_exit EXIT
  mkdir -p "$PCP/work"
  local bucket
  bucket=$(checked_attr pcp-bucket '^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$')
  [[ -n $bucket ]] || die "metadata pcp-bucket is not set"
  install_nix
  install_tools
  configure_nix
  install_python
  install_agent "$bucket"
  install_unit
  link_gpu_driver
  local next
  next=$(after_bootstrap "$BOOTSTRAPPED")
  if [[ $next == poweroff ]]; then
    log "first boot: the bootstrap is complete and no run is waiting: powering off"
    shutdown -h now
    return 0
  fi
  start_agent
}

# Run when executed (as the guest environment does); sourcing only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
