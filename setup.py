"""Builds the optional CPU kernels as a plain shared library, ``nanoadam/_cpu_kernels.so``.

The kernels are a C ABI loaded with ctypes (``nanoadam/_cpu.py``): no Python or torch headers, no
libpython, so the library does not depend on the interpreter and the wheel is tagged
``py3-none-<platform>`` rather than for one CPython version. The build is optional: where no C++
compiler is available (or on a platform whose compiler rejects the GCC/Clang flags below, such as
MSVC on Windows) the package still installs and NanoAdam runs on its eager PyTorch path, saying so
once at its first step.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

compile_args = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]
link_args = []
if sys.platform.startswith("linux"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")


class PlainSharedLibrary(build_ext):
    """Names the output ``_cpu_kernels.so`` (no ``cpython-311-x86_64-linux-gnu`` tag) and links it
    without libpython."""

    def get_ext_filename(self, fullname: str) -> str:
        return fullname.replace(".", "/") + ".so"

    def get_libraries(self, ext):  # Windows would add pythonXY.lib; nothing here calls Python
        return ext.libraries

    def get_export_symbols(self, ext):  # no PyInit_ function: the C ABI exports its own symbols
        return ext.export_symbols


class InterpreterIndependentWheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False  # platform-specific: it carries a compiled library

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


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
    ],
    cmdclass={"build_ext": PlainSharedLibrary, "bdist_wheel": InterpreterIndependentWheel},
)
