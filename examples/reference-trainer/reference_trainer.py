"""Reference trainer honouring pcp's binary contract: synchronous data-parallel SGD, numpy only.

    python reference_trainer.py shepherd --port=PORT [training args...]
    python reference_trainer.py worker --head-node=HOST:PORT [training args...]

Problem: linear regression ``y = X @ w_true + noise`` generated from ``--seed`` on every node
(``--samples`` rows, ``--features`` columns), rows split by ``numpy.array_split`` into one shard
per worker: worker rank r (1..n, from PCP_NODE_RANK, else RANK) holds shard r-1. The shepherd
(rank 0) holds no data; it waits for the PCP_NUM_NODES-1 (else WORLD_SIZE-1) workers, owns the
parameters, averages the gradients weighted by shard size and applies ``w -= lr * grad``.

Wire protocol (TCP, no pickle): every message is one frame,
``4-byte big-endian header length | UTF-8 JSON header | payload``, where the header's ``nbytes``
counts the payload bytes that follow (a little-endian float64 vector, possibly empty):

    shepherd -> worker  {"type": "challenge", "nonce": N}                  once, on connecting
    worker -> shepherd  {"type": "hello", "rank": r, "nonce": M, "proof": P}
    shepherd -> worker  {"type": "welcome", "num_workers", "seed", "samples", "features", "steps",
                         "proof": Q}  or {"type": "reject", "reason"}
    shepherd -> worker  {"type": "params", "step": s} + parameters         for s = 1..steps
    worker -> shepherd  {"type": "grad", "step": s, "loss", "n"} + gradient (n = shard rows)
    shepherd -> worker  {"type": "done", "step": steps} + final parameters

Every connection is authenticated with the run's secret, PCP_RUN_SECRET (docs/agent.md),
which never crosses the wire: N and M are fresh random nonces, P is
HMAC-SHA256(secret, "pcp-hello|N|M|r") and Q is HMAC-SHA256(secret, "pcp-welcome|N|M|r"), so
the shepherd admits only nodes of this run and each worker knows it reached this run's
shepherd. A connection without the proof, or with a forged one, is rejected and closed;
the shepherd keeps waiting for its workers. Without PCP_RUN_SECRET (a run by hand) nothing is
authenticated, and the shepherd says so on stderr.

A closed connection (EOF, reset) or silence beyond ``--peer-timeout`` is a lost peer: the
survivor names it on stderr and exits 1, so no node hangs when a peer dies.

Fault injection: ``--fail-at-step K`` makes a node exit with ``--fail-exit-code`` at step K; with
``--fail-node R`` only the node of rank R fails (0 = shepherd), otherwise every worker fails and
the shepherd does not. ``--lose-shepherd-at-step K``: the shepherd vanishes (exit 137, no
metrics) at step K. ``--hang``: sleep forever once connected.

Progress: the shepherd prints ``pcp-progress step=S loss=L`` on stdout (the global loss, about 50
times a run), the line pcp's live view and run summary read (docs/agent.md, "Progress").

Outputs in PCP_OUTPUT_DIR (default ./output): ``metrics.json`` on every node (also written on
failure and SIGTERM; ``loss[k]`` is the loss before update k+1), and on the shepherd
``checkpoint.npz`` (key ``w``: the parameters, ``step``: updates applied).
Exit codes: 0 success, 1 lost peer or timeout, 2 usage, 143 SIGTERM, or the injected code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

_LEN = struct.Struct(">I")
_MAX_HEADER = 1 << 20
_MAX_PAYLOAD = 1 << 30


class Stop(Exception):
    """End the run: print the message to stderr, record `status`, exit with `code`."""

    def __init__(self, message: str, code: int = 1, status: str = "failed") -> None:
        super().__init__(message)
        self.code, self.status = code, status


class PeerLost(Stop):
    """The other end closed, reset, sent garbage or went silent."""


def log(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", flush=True)


def progress(step: int, loss: float) -> None:
    """The binary contract's progress line (docs/agent.md): `pcp run --wait` shows the step,
    the loss and a loss curve from it, and the run summary draws the curve."""
    print(f"pcp-progress step={step} loss={loss:.6g}", flush=True)


def err(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def send_msg(sock: socket.socket, header: dict[str, Any], vec: np.ndarray | None = None) -> None:
    payload = b"" if vec is None else np.asarray(vec, dtype="<f8").tobytes()
    head = json.dumps({**header, "nbytes": len(payload)}).encode()
    try:
        sock.sendall(_LEN.pack(len(head)) + head + payload)
    except OSError as e:
        raise PeerLost(f"send failed: {e}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except OSError as e:  # TimeoutError included: the peer went silent
            raise PeerLost(str(e) or type(e).__name__) from None
        if k == 0:
            raise PeerLost("connection closed")
        got += k
    return bytes(buf)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], np.ndarray]:
    (hlen,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if hlen > _MAX_HEADER:
        raise PeerLost(f"bad frame: header of {hlen} bytes")
    try:
        header = json.loads(_recv_exact(sock, hlen))
        nbytes = int(header.get("nbytes", 0))
    except (ValueError, AttributeError) as e:
        raise PeerLost(f"bad frame header: {e}") from None
    if not 0 <= nbytes <= _MAX_PAYLOAD or nbytes % 8:
        raise PeerLost(f"bad frame: payload of {nbytes} bytes")
    return header, np.frombuffer(_recv_exact(sock, nbytes), dtype="<f8").astype(np.float64)


def run_secret() -> bytes | None:
    """The run's secret from the environment; None when the trainer runs without one."""
    value = os.environ.get("PCP_RUN_SECRET", "")
    return value.encode() if value else None


def proof(secret: bytes, purpose: str, nonce: str, worker_nonce: str, rank: object) -> str:
    """HMAC-SHA256 over one handshake step: proves the secret without sending it."""
    text = f"pcp-{purpose}|{nonce}|{worker_nonce}|{rank}"
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def proven(secret: bytes | None, claim: object, purpose: str, nonce: str,
           worker_nonce: object, rank: object) -> bool:
    if secret is None:
        return True
    if not isinstance(claim, str) or not isinstance(worker_nonce, str):
        return False
    return hmac.compare_digest(claim, proof(secret, purpose, nonce, worker_nonce, rank))


def make_shard(cfg: dict[str, Any], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of worker `rank` from the problem described by the shepherd's welcome `cfg`."""
    rng = np.random.default_rng(cfg["seed"])
    w_true = rng.normal(size=cfg["features"])
    x = rng.normal(size=(cfg["samples"], cfg["features"]))
    y = x @ w_true + 0.1 * rng.normal(size=cfg["samples"])
    rows = np.array_split(np.arange(cfg["samples"]), cfg["num_workers"])[rank - 1]
    return x[rows], y[rows]


def loss_and_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    r = x @ w - y
    return float(r @ r) / (2 * len(y)), x.T @ r / len(y)


def should_fail(args: argparse.Namespace, rank: int, step: int) -> bool:
    if args.fail_at_step is None or step != args.fail_at_step:
        return False
    return rank == args.fail_node if args.fail_node is not None else rank != 0


def check_fail(args: argparse.Namespace, rank: int, step: int) -> None:
    if should_fail(args, rank, step):
        code = args.fail_exit_code
        raise Stop(f"injected failure at step {step}: exit {code}", code, "injected-failure")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def hang_forever(tag: str) -> None:
    log(tag, "--hang: sleeping forever")
    while True:
        time.sleep(3600)


def accept_workers(srv: socket.socket, n: int, args: argparse.Namespace) -> dict[int, Any]:
    conns: dict[int, socket.socket] = {}
    secret = run_secret()
    if secret is None:
        err("shepherd", "PCP_RUN_SECRET is not set: connections are not authenticated")
    start = time.monotonic()
    while len(conns) < n:
        waited = time.monotonic() - start
        if waited >= args.connect_timeout:
            missing = sorted(set(range(1, n + 1)) - set(conns))
            raise Stop(f"timed out after {args.connect_timeout:g} s waiting for workers: "
                       f"{len(conns)} of {n} connected, missing rank(s) {missing}")
        srv.settimeout(min(args.connect_timeout - waited, 5.0))
        try:
            conn, addr = srv.accept()
        except TimeoutError:
            log("shepherd", f"waiting for workers: {len(conns)}/{n} connected ({waited:.0f} s)")
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(10.0)
        nonce = secrets.token_hex(16)
        try:
            send_msg(conn, {"type": "challenge", "nonce": nonce})
            hello, _ = recv_msg(conn)
        except PeerLost as e:
            err("shepherd", f"dropped connection from {addr[0]}: {e}")
            conn.close()
            continue
        rank, theirs = hello.get("rank"), hello.get("nonce")
        if hello.get("type") != "hello" or not proven(secret, hello.get("proof"), "hello",
                                                       nonce, theirs, rank):
            err("shepherd", f"rejected connection from {addr[0]}: authentication failed "
                            "(no proof of the run secret, or a wrong one)")
            with contextlib.suppress(PeerLost):
                send_msg(conn, {"type": "reject", "reason": "authentication failed"})
            conn.close()
            continue
        if rank not in set(range(1, n + 1)) - set(conns):
            reason = f"rank {rank!r} is not a free worker rank in 1..{n}"
            err("shepherd", f"rejected connection from {addr[0]}: {reason}")
            with contextlib.suppress(PeerLost):
                send_msg(conn, {"type": "reject", "reason": reason})
            conn.close()
            continue
        conn.settimeout(args.peer_timeout)
        welcome = {"type": "welcome", "num_workers": n, "seed": args.seed,
                   "samples": args.samples, "features": args.features, "steps": args.steps}
        if secret is not None:
            welcome["proof"] = proof(secret, "welcome", nonce, str(theirs), rank)
        send_msg(conn, welcome)
        conns[rank] = conn
        log("shepherd", f"worker rank {rank} connected from {addr[0]} ({len(conns)}/{n})")
    return conns


def gather(conns: dict[int, socket.socket], step: int, timeout: float) -> dict[int, Any]:
    """Receive every worker's gradient for `step`, noticing whichever worker drops first."""
    got: dict[int, tuple[dict[str, Any], np.ndarray]] = {}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for r, conn in conns.items():
            sel.register(conn, selectors.EVENT_READ, r)
        while len(got) < len(conns):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(conns) - set(got))
                raise PeerLost(f"timed out after {timeout:g} s waiting for the step {step} "
                               f"gradient of worker rank(s) {missing}")
            for key, _ in sel.select(remaining):
                rank: int = key.data
                try:
                    header, vec = recv_msg(conns[rank])
                except PeerLost as e:
                    raise PeerLost(f"lost worker rank {rank} at step {step}: {e}") from None
                if header.get("type") != "grad" or header.get("step") != step:
                    raise PeerLost(f"worker rank {rank} sent {header!r} at step {step}")
                got[rank] = (header, vec)
                sel.unregister(conns[rank])
    return got


def broadcast(conns: dict[int, socket.socket], header: dict[str, Any], w: np.ndarray) -> None:
    for rank, conn in conns.items():
        try:
            send_msg(conn, header, w)
        except PeerLost as e:
            raise PeerLost(f"lost worker rank {rank} at step {header['step']}: {e}") from None


def run_shepherd(args: argparse.Namespace, num_workers: int, out: Path) -> int:
    w, losses, t0 = np.zeros(args.features), list[float](), time.monotonic()
    code, status, conns = 0, "succeeded", dict[int, socket.socket]()
    every = max(1, args.steps // 50)
    try:
        try:
            srv = socket.create_server((args.host, args.port))
        except OSError as e:
            raise Stop(f"cannot listen on {args.host}:{args.port}: {e}") from None
        with srv:
            log("shepherd", f"listening on {args.host}:{args.port} for {num_workers} worker(s)")
            conns = accept_workers(srv, num_workers, args)
        if args.hang:
            hang_forever("shepherd")
        for step in range(1, args.steps + 1):
            if step == args.lose_shepherd_at_step:
                err("shepherd", f"--lose-shepherd-at-step {step}: vanishing with exit 137")
                os._exit(137)
            check_fail(args, 0, step)
            broadcast(conns, {"type": "params", "step": step}, w)
            grads = gather(conns, step, args.peer_timeout)
            total = sum(h["n"] for h, _ in grads.values())
            loss = sum(h["n"] * h["loss"] for h, _ in grads.values()) / total
            w = w - args.lr * sum(h["n"] * g for h, g in grads.values()) / total
            losses.append(float(loss))
            if step % every == 0 or step == args.steps:
                log("shepherd", f"step {step}/{args.steps} loss {loss:.6f}")
                progress(step, loss)
            time.sleep(args.step_sleep)
        broadcast(conns, {"type": "done", "step": args.steps}, w)
        log("shepherd", f"done: loss {losses[0]:.6f} -> {losses[-1]:.6f}" if losses else "done")
    except Stop as e:
        err("shepherd", str(e))
        code, status = e.code, e.status
        if isinstance(e, PeerLost) and args.peer_loss_grace > 0:
            code, status = linger(args.peer_loss_grace, code, status)
    finally:
        for conn in conns.values():
            conn.close()
        write_json(out / "metrics.json", {
            "role": "shepherd", "rank": 0, "run_id": os.environ.get("PCP_RUN_ID"),
            "status": status, "exit_code": code, "steps": args.steps,
            "steps_completed": len(losses), "loss": losses,
            "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "num_workers": num_workers,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
            "samples": args.samples, "features": args.features,
            "elapsed_s": round(time.monotonic() - t0, 3)})
        if losses:
            with open(out / "checkpoint.npz.tmp", "wb") as f:
                np.savez(f, w=w, step=np.int64(len(losses)))
            os.replace(out / "checkpoint.npz.tmp", out / "checkpoint.npz")
    return code


def linger(grace: float, code: int, status: str) -> tuple[int, str]:
    """After losing a worker, give its own failure time to reach the control plane first.

    The run's reason then names the root cause (the worker's exit code), not this node's
    consequential exit; the control plane usually stops this node during the wait.
    """
    err("shepherd", f"waiting up to {grace:g} s before exiting, so the lost worker's own "
                    "exit is reported first")
    try:
        time.sleep(grace)
    except Stop as e:
        return e.code, e.status
    return code, status


def connect(host: str, port: int, timeout: float, tag: str) -> socket.socket:
    start, next_note = time.monotonic(), 0.0
    while True:
        waited = time.monotonic() - start
        try:
            return socket.create_connection((host, port), timeout=max(0.1, min(5.0, timeout)))
        except OSError as e:
            if waited >= timeout:
                raise Stop(f"gave up after {timeout:g} s: cannot reach shepherd at "
                           f"{host}:{port} ({e})") from None
            if waited >= next_note:
                log(tag, f"waiting for shepherd at {host}:{port} ({waited:.0f} s)")
                next_note += 5.0
            time.sleep(max(0.0, min(0.5, timeout - waited)))


def run_worker(args: argparse.Namespace, rank: int, out: Path) -> int:
    tag, (host, port) = f"worker {rank}", args.head_node
    losses: list[float] = []
    code, status, sock, shard = 0, "succeeded", None, 0
    try:
        sock = connect(host, port, args.connect_timeout, tag)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(args.peer_timeout)
        secret, mine = run_secret(), secrets.token_hex(16)
        challenge, _ = recv_msg(sock)
        nonce = challenge.get("nonce")
        if challenge.get("type") != "challenge" or not isinstance(nonce, str):
            raise Stop(f"{host}:{port} is not a shepherd of this trainer (no challenge)")
        hello: dict[str, Any] = {"type": "hello", "rank": rank, "nonce": mine}
        if secret is not None:
            hello["proof"] = proof(secret, "hello", nonce, mine, rank)
        send_msg(sock, hello)
        welcome, _ = recv_msg(sock)
        if welcome.get("type") != "welcome":
            raise Stop(f"shepherd rejected this worker: {welcome.get('reason')}")
        if not proven(secret, welcome.get("proof"), "welcome", nonce, mine, rank):
            raise Stop(f"the shepherd at {host}:{port} did not prove the run secret: "
                       "refusing to train with it")
        x, y = make_shard(welcome, rank)
        shard, steps = len(y), welcome["steps"]
        log(tag, f"connected to shepherd at {host}:{port}: shard of {shard} rows, "
                 f"{welcome['num_workers']} worker(s)")
        if args.hang:
            hang_forever(tag)
        rng, every = np.random.default_rng([welcome["seed"], rank]), max(1, steps // 50)
        sock.settimeout(args.connect_timeout + args.peer_timeout)  # others may still connect
        while True:
            header, w = recv_msg(sock)
            sock.settimeout(args.peer_timeout)
            if header.get("type") == "done":
                break
            step = int(header["step"])
            check_fail(args, rank, step)
            loss, grad = loss_and_grad(w, x, y)
            if 0 < args.batch_size < shard:
                rows = rng.choice(shard, size=args.batch_size, replace=False)
                grad = loss_and_grad(w, x[rows], y[rows])[1]
            send_msg(sock, {"type": "grad", "step": step, "loss": loss, "n": shard}, grad)
            losses.append(loss)
            if step % every == 0 or step == steps:
                log(tag, f"step {step}/{steps} shard loss {loss:.6f}")
            time.sleep(args.step_sleep)
        log(tag, "done")
    except Stop as e:
        lost = isinstance(e, PeerLost)
        err(tag, f"lost connection to shepherd at {host}:{port}: {e}" if lost else str(e))
        code, status = e.code, e.status
    finally:
        if sock is not None:
            sock.close()
        write_json(out / "metrics.json", {
            "role": "worker", "rank": rank, "run_id": os.environ.get("PCP_RUN_ID"),
            "status": status, "exit_code": code, "steps_completed": len(losses),
            "loss": losses, "shard_size": shard})
    return code


def head_node(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add = common.add_argument
    add("--steps", type=int, default=50, help="SGD steps (default 50)")
    add("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    add("--batch-size", type=int, default=0, help="rows per worker gradient (0 = whole shard)")
    add("--seed", type=int, default=0, help="seed of the generated problem (default 0)")
    add("--samples", type=int, default=4096, help="rows in the whole problem (default 4096)")
    add("--features", type=int, default=20, help="features (default 20)")
    add("--step-sleep", type=float, default=0.0, metavar="SECONDS", help="sleep after each step")
    add("--connect-timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long to wait for the workers / the shepherd (default 600)")
    add("--peer-timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long a peer may stay silent during training (default 600)")
    add("--peer-loss-grace", type=float, default=5.0, metavar="SECONDS",
        help="shepherd: wait this long after losing a worker before exiting (default 5)")
    add("--fail-at-step", type=int, metavar="K", help="exit with --fail-exit-code at step K")
    add("--fail-exit-code", type=int, default=3, metavar="C", help="(default 3)")
    add("--fail-node", type=int, metavar="RANK",
        help="only this node rank fails (default: every worker, not the shepherd)")
    add("--hang", action="store_true", help="sleep forever once connected")
    add("--lose-shepherd-at-step", type=int, metavar="K", help="shepherd exits 137 at step K")
    parser = argparse.ArgumentParser(prog="reference_trainer.py", allow_abbrev=False,
                                     description="pcp reference trainer (data-parallel SGD).")
    roles = parser.add_subparsers(dest="role", required=True)
    shep = roles.add_parser("shepherd", parents=[common], allow_abbrev=False)
    shep.add_argument("--port", type=int, required=True)
    shep.add_argument("--host", default=os.environ.get("PCP_TRAINER_HOST", "0.0.0.0"),
                      help="address to listen on (default $PCP_TRAINER_HOST, else 0.0.0.0)")
    work = roles.add_parser("worker", parents=[common], allow_abbrev=False)
    env_head = os.environ.get("PCP_HEAD_NODE")
    work.add_argument("--head-node", type=head_node, required=not env_head, default=env_head,
                      metavar="HOST:PORT", help="the shepherd (default: $PCP_HEAD_NODE)")
    return parser


def env_int(*names: str) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise Stop(f"{name}={value!r} is not an integer", 2) from None
    raise Stop(f"{' or '.join(names)} must be set", 2)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Stop("received SIGTERM: exiting", 128 + signum, "terminated")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(os.environ.get("PCP_OUTPUT_DIR") or "output")
    try:
        if args.role == "shepherd":
            num_workers = env_int("PCP_NUM_NODES", "WORLD_SIZE") - 1
            if num_workers < 1:
                raise Stop("PCP_NUM_NODES must be at least 2 (the shepherd and a worker)", 2)
        else:
            rank = env_int("PCP_NODE_RANK", "RANK")
            if rank < 1:
                raise Stop(f"a worker's node rank must be 1 or more, got {rank}", 2)
    except Stop as e:
        err(args.role, str(e))
        return e.code
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.role == "shepherd":
        return run_shepherd(args, num_workers, out)
    return run_worker(args, rank, out)


if __name__ == "__main__":
    sys.exit(main())
