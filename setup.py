"""Build script: ONE extension, mailfilter._core, from _core/_core.pyx.

_core.pyx `include`s one .pxi per concept (hash table, Aho-Corasick, wildmat,
CIDR trie, list matcher, CRAM-MD5); several extensions under mailfilter._core.*
compile but fail to import (docs/architecture.md#build), hence the unity build.
Set MAILFILTER_DEBUG=1 to build with bounds checks and C asserts on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MAILFILTER_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

ext = Extension(
    "mailfilter._core",
    ["_core/_core.pyx"],
    extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O3"]),
    define_macros=([] if DEBUG else [("NDEBUG", "1")]),
)

setup(
    ext_modules=cythonize([ext], compiler_directives=directives,
                          include_path=["_core", "."]),
)
