"""``python -m selattn_bench.kernels --memory``: the peak resident memory of one forward (and
of forward + backward) at a large N, each case in a fresh process
(``selattn_bench.memory_probe``), against the bytes of the tensors the call must hold."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict

from .common import render, verdict

MEMORY_TARGET = 1.3           # issue 7, item 5: peak of a forward <= 1.3x q, k, v, out


def run_memory_case(args: argparse.Namespace, case: str) -> Dict[str, Any]:
    """One case in a fresh process (selattn_bench.memory_probe): its JSON line of figures."""
    cmd = [sys.executable, "-m", "selattn_bench.memory_probe", case, str(args.memory_n),
           str(args.heads), str(args.dim), str(args.batch), str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"memory child ({case}) failed with code {proc.returncode}:\n"
                           f"{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_report(args: argparse.Namespace) -> None:
    MiB = 2.0 ** 20
    B, H, N, D = args.batch, args.heads, args.memory_n, args.dim
    print(f"peak resident memory, B={B}, H={H}, N={N}, D={D}, float32, {args.threads} threads, "
          "each case in a fresh process (whole process: interpreter, NumPy, selattn_c)")
    headers = ["case", "tensors", "tensor MiB", "RSS after imports", "RSS before call",
               "peak RSS", "peak / tensors", "(peak - imports) / tensors", "time s",
               f"<= {MEMORY_TARGET}x (whole / net)"]
    cases = [("forward", "fwd", "q,k,v,out"),
             ("forward+backward", "fwdbwd", "q,k,v,out,dout,dq,dk,dv")]
    rows = []
    for label, case, tensors in cases:
        info = run_memory_case(args, case)
        whole = info["peak"] / info["tensor_bytes"]
        net = (info["peak"] - info["rss_after_imports"]) / info["tensor_bytes"]
        seconds = info["fwd_seconds"] + info.get("bwd_seconds", 0.0)
        rows.append([label, tensors, f"{info['tensor_bytes'] / MiB:.0f}",
                     f"{info['rss_after_imports'] / MiB:.0f} MiB",
                     f"{info['rss_before_call'] / MiB:.0f} MiB", f"{info['peak'] / MiB:.0f} MiB",
                     f"{whole:.2f}x", f"{net:.2f}x", f"{seconds:.1f}",
                     " / ".join(verdict(x, "<=", MEMORY_TARGET)[1] for x in (whole, net))])
    print(render(headers, rows, args.markdown, [False, False, True, True, True, True, True, True,
                                                True, False]))
    print(f"issue 7 target 5: the forward's peak resident memory <= {MEMORY_TARGET}x the bytes of "
          f"q, k, v and out ({4 * B * H * N * D * 4 / MiB:.0f} MiB -> "
          f"{MEMORY_TARGET * 4 * B * H * N * D * 4 / MiB:.0f} MiB). Peak is ru_maxrss of the "
          "child process. 'whole' counts the whole process (interpreter, NumPy and their "
          "libraries included); 'net' subtracts the resident set after the imports, i.e. what "
          "the tensors and the call add.")
