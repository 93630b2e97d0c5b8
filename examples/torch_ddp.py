"""Data-parallel training of the torch port of the tiny LM with DistributedDataParallel (gloo, CPU).

    python examples/torch_ddp.py                      # 2 processes on this machine, 8 steps
    python examples/torch_ddp.py --world-size 2 --steps 20

Every process (rank) builds the same model (``selattn_lm.torch_model.TinyLM`` from
``init_params``), wraps it in ``DistributedDataParallel`` and trains on its own share of each
global batch (rank r takes examples r, r + W, r + 2W, ... of the batch all ranks draw from the
same seeded stream). The attention (``selattn_c.torch.SelectiveSelfAttention``) has no parameters
of its own: the C kernels run in each process on its own batch, the gradients of q, k, v flow
into the qkv projection, and DDP all-reduces (averages) every parameter's gradient, so all ranks
take the same optimizer step. Each process sets ``selattn_c.set_num_threads`` and
``torch.set_num_threads`` to cores / processes, so the processes do not oversubscribe the cores.
The processes meet on 127.0.0.1 only (gloo's TCP store on a free local port).

Checks, printed as one JSON line by rank 0 (``tests/test_torch_bridge.py`` runs this script):

- ``max_param_diff_between_ranks``: the largest difference of any parameter between the ranks
  after training (0: DDP kept the replicas identical);
- ``max_curve_rel_diff``: the mean over ranks of the per-rank loss, step by step, against a
  single process that trains the same model on the same global batches with the loss
  ``mean_r loss(share r)`` (whose gradient is exactly the average DDP computes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import selattn_c
from selattn_lm.torch_model import TinyLM, optimizer_for
from selattn_lm.training import TrainConfig, learning_rate, memory_loss_weight
from selattn_lm import model as lm
from selattn_lm.task_assign import AssignTask
from selattn_lm.tasks import encode_batch, generate_examples

CONFIG = dict(task=AssignTask(n_assignments=8, heldout_size=1), batch_size=16, warmup_steps=2,
              eval_every=1000)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shares(cfg: TrainConfig, steps: int, world: int) -> List[List[Tuple[np.ndarray, ...]]]:
    """For each step, the W shares (tokens, targets, mask) of the global batch."""
    task = cfg.task.config()
    tokenizer = cfg.task.tokenizer
    context = cfg.context
    rng = np.random.default_rng([cfg.seed, 1])
    out = []
    for _ in range(steps):
        batch = generate_examples(rng, task, cfg.batch_size)
        out.append([encode_batch(tokenizer, batch[r::world], context) for r in range(world)])
    return out


def new_model(cfg: TrainConfig) -> TinyLM:
    model_cfg = cfg.model_config()
    return TinyLM.from_reference(lm.init_params(model_cfg, seed=cfg.seed), model_cfg)


def train_step(model, optimizer, losses_of_shares, cfg: TrainConfig, step: int) -> None:
    loss = sum(losses_of_shares) / len(losses_of_shares)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg)
    optimizer.step()


def worker(rank: int, world: int, port: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    threads = max(1, (os.cpu_count() or 1) // world)      # cores per process
    selattn_c.set_num_threads(threads)
    torch.set_num_threads(threads)
    cfg = TrainConfig(steps=steps, **CONFIG)
    model = new_model(cfg)
    ddp = DistributedDataParallel(model)                  # broadcasts rank 0's weights
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay)
    curve = []
    for step, step_shares in enumerate(shares(cfg, steps, world)):
        tokens, targets, mask = step_shares[rank]
        _, losses = ddp(tokens, targets, mask, eps=memory_loss_weight(step, cfg))
        train_step(model, optimizer, [losses["total"]], cfg, step)   # DDP averages the grads
        mean_loss = losses["total"].detach().clone()
        dist.all_reduce(mean_loss)                        # sum over ranks, for the log
        curve.append(mean_loss.item() / world)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
        queue.put({"curve": curve, "max_param_diff_between_ranks": spread, "threads": threads})
    dist.barrier()              # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def single_process(steps: int, world: int) -> List[float]:
    """The same training in one process: the loss of a step is the mean of the W shares'."""
    cfg = TrainConfig(steps=steps, **CONFIG)
    model = new_model(cfg)
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay)
    curve = []
    for step, step_shares in enumerate(shares(cfg, steps, world)):
        eps = memory_loss_weight(step, cfg)
        losses = [model(t, y, m, eps=eps)[1]["total"] for t, y, m in step_shares]
        train_step(model, optimizer, losses, cfg, step)
        curve.append(sum(x.item() for x in losses) / world)
    return curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2, help="processes (default 2)")
    p.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.steps < 1:
        p.error("--world-size and --steps must be >= 1")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    mp.start_processes(worker, args=(args.world_size, port, args.steps, queue),
                       nprocs=args.world_size, join=True, start_method="spawn")
    result = queue.get()
    selattn_c.set_num_threads(max(1, (os.cpu_count() or 1)))
    reference = single_process(args.steps, args.world_size)
    curve = result["curve"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(curve, reference))
    report = {"world_size": args.world_size, "backend": "gloo", "address": f"127.0.0.1:{port}",
              "threads_per_process": result["threads"], "steps": args.steps,
              "ddp_curve": curve, "single_process_curve": reference,
              "max_curve_rel_diff": rel,
              "max_param_diff_between_ranks": result["max_param_diff_between_ranks"]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
