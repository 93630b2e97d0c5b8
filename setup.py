"""Build and install selattn.

Two import packages: ``selattn_reference`` (the NumPy spec, from ``reference/``) and
``selattn_c`` (the C extension and its wrappers).
"""

from pathlib import Path

from setuptools import setup

README = Path(__file__).with_name("README.md")

setup(
    name="selattn",
    version="0.1.0",
    description="Selective attention (Leviathan et al. 2024): NumPy reference and fast C kernels",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["selattn_reference", "selattn_c"],
    package_dir={"selattn_reference": "reference", "selattn_c": "selattn_c"},
    # The trained checkpoints (and their training logs) install with the package.
    package_data={"selattn_c": ["data/*"]},
    entry_points={"console_scripts": ["selattn = selattn_c.cli:main"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["selattn_c/build_ffi.py:ffibuilder"],
    install_requires=["numpy>=1.22", "cffi>=1.15"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.50"],
        # Only for `python -m selattn_c.bench` (PyTorch baselines); nothing else imports torch.
        "bench": ["torch>=2.1"],
        # Only for the PNG mask pictures of `selattn demo` / `selattn plot` (ASCII without it).
        "plot": ["matplotlib>=3.6"],
    },
)
