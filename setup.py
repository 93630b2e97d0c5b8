"""Build and install selattn.

Four import packages, one concern each: ``selattn_reference`` (the NumPy spec),
``selattn_c`` (the C extension and its wrapper), ``selattn_lm`` (the tiny language model:
training, inference, the ``selattn`` command, the bundled checkpoints) and ``selattn_bench``
(the benchmarks).

The C extension is built when it can be. Without a working C compiler the install still succeeds,
with a warning, as a pure-Python install: the NumPy reference, ``selattn train`` and ``selattn
eval`` (on the NumPy attention) work, and whatever needs the kernels says so when called
(``selattn_c.ExtensionNotBuilt``). ``SELATTN_NO_EXTENSION=1`` skips the build on purpose;
``SELATTN_REQUIRE_EXTENSION=1`` turns a failed build into a failed install.
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

README = Path(__file__).with_name("README.md")
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext that warns, instead of failing the install, when the C kernels cannot be built."""

    def run(self):
        try:
            super().run()
        except BUILD_ERRORS as e:
            self._give_up(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as e:
            self._give_up(e)

    @staticmethod
    def _give_up(error: Exception) -> None:
        if _flag("SELATTN_REQUIRE_EXTENSION"):
            raise error
        print(f"selattn: WARNING: the C extension could not be built ({error}); installing the "
              "pure-Python parts only: selattn_reference and selattn train/eval (NumPy attention) "
              "work, the C kernels, KVCache and selattn demo do not. Install a C compiler and "
              "reinstall for them (SELATTN_REQUIRE_EXTENSION=1 makes this an error).",
              file=sys.stderr)


# cffi_modules builds selattn_c._selattn_cffi from csrc/ (selattn_c/build_ffi.py).
EXTENSION = {} if _flag("SELATTN_NO_EXTENSION") else {
    "cffi_modules": ["selattn_c/build_ffi.py:ffibuilder"],
    "cmdclass": {"build_ext": OptionalBuildExt},
}

setup(
    name="selattn",
    version="0.1.0",
    description="Selective attention (Leviathan et al. 2024): NumPy reference and fast C kernels",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["selattn_reference", "selattn_c", "selattn_lm", "selattn_lm.corpora",
              "selattn_bench"],
    # The trained checkpoints (and their training logs) install with the package, and so do the
    # golden vectors the conformance kit checks against (a copy of tests/data/golden).
    package_data={"selattn_lm": ["data/*"], "selattn_reference": ["data/golden/*"]},
    entry_points={"console_scripts": ["selattn = selattn_lm.cli:main"]},
    setup_requires=["cffi>=1.15"],
    **EXTENSION,
    # tqdm: progress bars of the long commands; threadpoolctl: --threads bounds NumPy's BLAS.
    install_requires=["numpy>=1.22", "cffi>=1.15", "tqdm>=4.60", "threadpoolctl>=3.1"],
    extras_require={
        # gensim carries the Wikipedia sample of the text task (selattn_lm.text) in its
        # wheel; the tests check the split of that very file, so the test extra brings it too.
        "test": ["pytest>=7", "hypothesis>=6.50", "gensim>=4.0"],
        # Only for the text task (selattn train --task text, selattn text-results): its data.
        "text": ["gensim>=4.0"],
        # Only for the benchmarks' PyTorch baselines (`python -m selattn_bench.kernels`;
        # selattn_bench.torch_compare also runs the bridge, which needs the "torch" extra).
        "bench": ["torch>=2.1"],
        # The PyTorch bridge (selattn_c.torch, selattn_lm.torch_model; docs/torch.md).
        # torch.library.custom_op (register_fake, register_autograd) needs torch 2.4.
        "torch": ["torch>=2.4"],
        # Hugging Face transformers (selattn_c.hf, selattn_lm.hf_gpt2; docs/torch.md): pinned to
        # the version the tests ran on (its attention, mask and cache interfaces change often).
        "hf": ["torch>=2.6", "transformers==5.25.0"],
        # Only for the PNG mask pictures of `selattn demo` / `selattn plot` (ASCII without it).
        "plot": ["matplotlib>=3.6"],
    },
)
