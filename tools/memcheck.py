"""Run tools/memcheck_entry_points.py under valgrind memcheck and count what is selattn's.

    python tools/memcheck.py [script.py]   # needs valgrind and an installed selattn_c

CPython itself makes valgrind report errors (its import machinery, even with PYTHONMALLOC=malloc)
and "leaks" (objects alive at exit). So the log is split into its records, and a record counts
when one of its stack frames is selattn's C code: the kernels in csrc/ or the cffi wrappers of
the C API (``_cffi_f_selattn_*``). The extension's module initialisation (``_cffi_init``, which
only imports cffi's backend through CPython) is not selattn's code. The script prints the counts
and exits 1 unless there are 0 errors and 0 bytes definitely lost in selattn's code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("memcheck_entry_points.py")
OURS = re.compile(r"\b(_cffi_f_selattn_\w+|selattn_\w+|forward_with_evictions|"
                  r"selector_block_prefix|mask_of_tile|mask_tile|selection_\w+|transpose_blocks|"
                  r"walk\w*|prefill_by_steps|attend_head|update_mask|big_alloc|soft_\w+|"
                  r"select_kth|cut_share_grads|dead_\w+)\b|"
                  r"\((selattn_forward|selattn_backward|selattn_mask|selattn_memory|selector_mask|"
                  r"kv_cache|rank_penalty|dead_keys|threads|finite|tile_kernels\w*)\.[ch]:\d+\)")
NOT_OURS = re.compile(r"\b(_cffi_init|PyInit__selattn_cffi)\b")
LOST = re.compile(r"([\d,]+) bytes in [\d,]+ blocks are definitely lost")


def records(log: str):
    """The log's records: runs of lines between blank ``==pid==`` lines, prefixes removed."""
    block = []
    for line in log.splitlines():
        text = re.sub(r"^==\d+== ?", "", line)
        if text.strip():
            block.append(text)
        elif block:
            yield block
            block = []
    if block:
        yield block


def is_ours(block) -> bool:
    frames = [line for line in block if re.match(r"\s+(at|by) 0x", line)]
    return any(OURS.search(f) and not NOT_OURS.search(f) for f in frames)


def main(script: Path = SCRIPT) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "memcheck.log"
        cmd = ["valgrind", "--tool=memcheck", "--leak-check=full", "--num-callers=40",
               f"--log-file={log_path}", sys.executable, str(script)]
        env = dict(os.environ, PYTHONMALLOC="malloc")
        run = subprocess.run(cmd, env=env)
        log = log_path.read_text(errors="replace")
    errors, lost_bytes, total_errors = 0, 0, 0
    for block in records(log):
        head = block[0]
        lost = LOST.search(head)
        if lost:
            if is_ours(block):
                lost_bytes += int(lost.group(1).replace(",", ""))
                print("\n".join(block), file=sys.stderr)
        elif re.match(r"(Invalid|Conditional jump|Use of uninitialised|Syscall param|"
                      r"Mismatched free|Source and destination overlap|Argument)", head):
            total_errors += 1
            if is_ours(block):
                errors += 1
                print("\n".join(block), file=sys.stderr)
    summary = re.search(r"ERROR SUMMARY: .*", log)
    print(f"valgrind memcheck: {errors} errors and {lost_bytes} bytes definitely lost in "
          f"selattn's code ({total_errors} error records in all, the rest CPython's; "
          f"valgrind's own line: {summary.group(0) if summary else 'none'})")
    if run.returncode != 0:
        print(f"the script under valgrind exited with {run.returncode}", file=sys.stderr)
        return 1
    return 0 if errors == 0 and lost_bytes == 0 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else SCRIPT))
