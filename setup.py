"""Builds the optional CPU kernels (plain C ABI, loaded with ctypes; no torch headers needed).

The extension is optional: where no C++ compiler is available the package still installs and
NanoAdam falls back to its eager PyTorch path (see nanoadam._cpu.available()).
"""

import sys

from setuptools import Extension, setup

compile_args = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]
link_args = []
if sys.platform.startswith("linux"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

setup(
    ext_modules=[
        Extension(
            "nanoadam._cpu_kernels",
            sources=["src/nanoadam/csrc/cpu_kernels.cpp"],
            language="c++",
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
