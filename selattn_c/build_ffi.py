"""cffi build script (API mode) for the C kernels in ``csrc/``.

Used by ``setup.py`` through ``cffi_modules=["selattn_c/build_ffi.py:ffibuilder"]``; running this
file directly builds the extension in place (handy while hacking on ``csrc/``).

Compiler flags: ``-O3`` and C99 with GNU vector extensions; never ``-ffast-math``/``-Ofast`` (they
would switch the whole Python process to flush-to-zero). No ``-march=native``: the AVX2/AVX-512
tile kernels are compiled with target pragmas and chosen at run time (csrc/tile_kernels.c).

OpenMP is probed by compiling and linking a tiny program with ``-fopenmp``. Where that fails the
build is serial and says so; ``SELATTN_NO_OPENMP=1`` forces a serial build.

``SELATTN_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer, for tests only
(``.ci/sanitize`` and docs/reliability.md say how to run Python with it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

def public_declarations(header: Path = CSRC / "selattn.h") -> str:
    """The C API for cffi's cdef: the part of selattn.h between its "cdef begin" and "cdef end"
    marks (comments and #defines of integer constants are fine in a cdef)."""
    text = header.read_text(encoding="utf-8")
    begin = text.index("*/", text.index("/* cdef begin")) + 2
    end = text.index("/* cdef end */")
    return text[begin:end]


SOURCES = [
    "selattn_forward.c",
    "selattn_backward.c",
    "selattn_mask.c",
    "selattn_memory.c",
    "kv_cache.c",
    "selector_mask.c",
    "rank_penalty.c",
    "dead_keys.c",
    "key_pack.c",
    "threads.c",
    "finite.c",
    "tile_kernels.c",
    "tile_kernels_generic.c",
    "tile_kernels_avx2.c",
    "tile_kernels_avx512.c",
]

BASE_FLAGS = ["-O3", "-std=gnu99", "-fno-strict-aliasing", "-Wall", "-Wno-psabi"]

# The sanitizer build: out-of-bounds and use-after-free (address), integer overflow, misaligned or
# null pointers, bad shifts (undefined); -fno-sanitize-recover makes any report abort the process,
# so a test run cannot pass with one. -O1 -g keeps the reported stacks readable.
SANITIZE_COMPILE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-g", "-O1"]
SANITIZE_LINK = ["-fsanitize=address,undefined"]


def sanitizer_flags() -> tuple[list[str], list[str]]:
    """(compile_args, link_args) of the sanitizer build when ``SELATTN_SANITIZE`` is set, else
    empty lists."""
    if os.environ.get("SELATTN_SANITIZE", "") in ("", "0"):
        return [], []
    print("selattn: SELATTN_SANITIZE is set: building with -fsanitize=address,undefined",
          file=sys.stderr)
    return SANITIZE_COMPILE, SANITIZE_LINK


def _compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()[0]


def openmp_flags(cc: str | None = None) -> tuple[list[str], list[str], str]:
    """Return (compile_args, link_args, serial_reason) for OpenMP.

    serial_reason is "" for an OpenMP build, else why the build is serial: "SELATTN_NO_OPENMP" or
    "no OpenMP in <compiler>". The extension reports it at run time (``selattn_c.build_info``)
    and warns on import when OpenMP was wanted but missing, since pip hides build output.
    """
    if os.environ.get("SELATTN_NO_OPENMP", "") not in ("", "0"):
        print("selattn: SELATTN_NO_OPENMP is set: building the serial (1-thread) kernels",
              file=sys.stderr)
        return [], [], "SELATTN_NO_OPENMP"
    cc = cc or _compiler()
    probe = ("#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\n"
             "n+=1;\nreturn omp_get_max_threads()>0?0:1;}\n")
    ok = False
    if shutil.which(cc) is not None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.c"
            src.write_text(probe)
            cmd = [cc, "-fopenmp", str(src), "-o", str(Path(tmp) / "probe")]
            try:
                ok = subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
    if not ok:
        msg = (f"selattn: WARNING: {cc} cannot build OpenMP programs (-fopenmp failed); "
               "building the serial kernels: every call will use one thread")
        warnings.warn(msg)
        print(msg, file=sys.stderr)
        return [], [], f"no OpenMP in {cc}"
    return ["-fopenmp"], ["-fopenmp"], ""


def openmp_pause_macros(omp_compile: list[str], cc: str | None = None) -> list[tuple[str, str]]:
    """``[("SELATTN_HAVE_OMP_PAUSE", "1")]`` when the OpenMP runtime links
    ``omp_pause_resource_all`` (OpenMP 5.0, used to make fork() safe: ``selattn_release_threads``
    in csrc/threads.c), else ``[]`` (a forked child then runs its kernels with 1 thread)."""
    if not omp_compile:
        return []
    cc = cc or _compiler()
    probe = ("#include <omp.h>\nint main(void){return omp_pause_resource_all(omp_pause_hard)"
             " == 12345;}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pause.c"
        src.write_text(probe)
        cmd = [cc, *omp_compile, str(src), "-o", str(Path(tmp) / "pause")]
        try:
            ok = subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    return [("SELATTN_HAVE_OMP_PAUSE", "1")] if ok else []


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


ffibuilder = FFI()
ffibuilder.cdef(public_declarations())
_omp_compile, _omp_link, _serial_reason = openmp_flags()
_san_compile, _san_link = sanitizer_flags()
ffibuilder.set_source(
    "selattn_c._selattn_cffi",
    '#include "selattn.h"\n',
    # relative to the working directory: setuptools rejects absolute source paths in some versions
    sources=[os.path.relpath(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    define_macros=[("SELATTN_SERIAL_REASON", _c_string(_serial_reason)),
                   *openmp_pause_macros(_omp_compile)],
    extra_compile_args=BASE_FLAGS + _omp_compile + _san_compile,   # later -O1 wins over -O3
    extra_link_args=_omp_link + _san_link + ["-lm"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
