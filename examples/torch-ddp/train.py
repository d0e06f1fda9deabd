"""A small PyTorch DistributedDataParallel trainer for pcp (docs/trainers.md).

It runs three ways, from the same file:

- as a pcp contract binary in the `all-nodes` layout: ``train.py shepherd --port=P`` is rank 0
  and ``train.py worker --head-node=H:P`` the other ranks;
- in the `workers-only` layout: the workers are ranks 0..N-1 and the shepherd only hosts the
  rendezvous store (a TCPStore on MASTER_PORT) until every rank has finished;
- as a stock torchrun script: ``torchrun --nproc-per-node=2 train.py --steps 5``, and so under
  pcp's torchrun launcher (binary ``torchrun:/abs/train.py``), which starts torchrun on every
  worker with a c10d rendezvous at the shepherd.

It reads only the standard variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and init_method="env://". Rank 0 writes ``metrics.json`` and ``checkpoint.pt`` to
PCP_OUTPUT_DIR (default ./output); every other node writes ``metrics.json`` too (a second
process on the same node, under torchrun, ``metrics-rank<R>.json``).
``--raise-on-rank R --raise-at-step S`` makes rank R raise at step S (to test failure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

FINISHED = "pcp-ddp/finished"
FAILED = "pcp-ddp/failed"


def parse(argv: list[str]) -> tuple[str | None, argparse.Namespace]:
    mode = argv[0] if argv and argv[0] in ("shepherd", "worker") else None
    parser = argparse.ArgumentParser(prog="train.py", allow_abbrev=False)
    parser.add_argument("--port", type=int)  # contract: shepherd --port=P
    parser.add_argument("--head-node")  # contract: worker --head-node=H:P
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--raise-on-rank", type=int, default=None)
    parser.add_argument("--raise-at-step", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--peer-loss-grace", type=float, default=5.0,
                        help="seconds the shepherd lingers after a rank failed")
    return mode, parser.parse_args(argv[1:] if mode else argv)


def write_json(path: Path, obj: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def host_store(args: argparse.Namespace, out: Path) -> int:
    """The shepherd of a `workers-only` run: the rendezvous store, until every rank is done."""
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("0.0.0.0", int(os.environ["MASTER_PORT"]), None, True,
                          timedelta(seconds=args.timeout), wait_for_workers=False)
    store.add(FINISHED, 0)
    t0 = time.monotonic()
    print(f"shepherd: store on port {os.environ['MASTER_PORT']} for {world} ranks", flush=True)
    while store.add(FINISHED, 0) < world:
        if store.check([FAILED]):
            # Linger so that the failing rank's own exit comes first and the run's reason
            # names it, not the store that noticed (pcp ends a run at its first failure).
            print(f"shepherd: rank {store.get(FAILED).decode()} failed", flush=True)
            time.sleep(args.peer_loss_grace)
            return 1
        if time.monotonic() - t0 > args.timeout:
            print("shepherd: timed out waiting for the ranks", flush=True)
            return 1
        time.sleep(0.1)
    summary = json.loads(store.get("pcp-ddp/metrics/0"))
    write_json(out / "metrics.json", {**summary, "role": "shepherd", "hosted_store": True})
    print("shepherd: every rank finished", flush=True)
    return 0


def shepherd_store(args: argparse.Namespace) -> dist.TCPStore | None:
    """A client of the store the shepherd hosts in the `workers-only` layout, else None
    (also under pcp's torchrun launcher, whose shepherd hosts only the rendezvous)."""
    if os.environ.get("PCP_LAYOUT") != "workers-only" or os.environ.get("PCP_LAUNCHER"):
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                         timedelta(seconds=30))


def train(args: argparse.Namespace, out: Path) -> int:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method="env://",
                            timeout=timedelta(seconds=args.timeout))
    try:
        torch.manual_seed(args.seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                      else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
        data = torch.Generator().manual_seed(args.seed + 1 + rank)
        target_w = torch.linspace(-1, 1, 8)
        losses: list[float] = []
        t0 = time.monotonic()
        for step in range(1, args.steps + 1):
            if args.raise_on_rank == rank and step == args.raise_at_step:
                raise RuntimeError(f"rank {rank} raises at step {step} (--raise-on-rank)")
            x = torch.randn(args.batch_size, 8, generator=data)
            y = (x @ target_w).unsqueeze(1)
            loss = nn.functional.mse_loss(ddp(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
            print(f"rank {rank}/{world}: step {step} loss {losses[-1]:.6f}", flush=True)
        metrics = {"rank": rank, "world_size": world, "local_rank": local_rank,
                   "backend": args.backend, "steps": args.steps, "steps_completed": len(losses),
                   "loss": losses, "initial_loss": losses[0] if losses else None,
                   "final_loss": losses[-1] if losses else None,
                   "run_id": os.environ.get("PCP_RUN_ID"),
                   "elapsed_s": round(time.monotonic() - t0, 3)}
        # One metrics.json per node; other processes of the same node (torchrun's
        # --nproc-per-node > 1) write metrics-rank<R>.json beside it.
        name = "metrics.json" if local_rank == 0 else f"metrics-rank{rank}.json"
        write_json(out / name, {**metrics, "role": os.environ.get("PCP_ROLE")})
        if rank == 0:
            tmp = out / "checkpoint.pt.tmp"
            torch.save({"model": model.state_dict(), "step": len(losses)}, tmp)
            os.replace(tmp, out / "checkpoint.pt")
        dist.barrier()
        if (store := shepherd_store(args)) is not None:
            if rank == 0:
                store.set("pcp-ddp/metrics/0", json.dumps(metrics))
            store.add(FINISHED, 1)
        return 0
    except BaseException:
        try:
            if (store := shepherd_store(args)) is not None:
                store.set(FAILED, str(rank))
        except (RuntimeError, OSError):  # the shepherd may be gone already (DistError)
            pass
        raise
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    mode, args = parse(argv)
    out = Path(os.environ.get("PCP_OUTPUT_DIR") or "output")
    if mode == "shepherd" and "RANK" not in os.environ:
        return host_store(args, out)
    return train(args, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
