"""Builds the in-database tensor module (a Redis/Valkey module, plain C shared object).

It is declared as an Extension so that both `pip install .` and `pip install -e .` compile it with the
platform's C compiler; it is never imported by Python, only loaded by the database server with
`--loadmodule`.
"""

from setuptools import Extension, setup

# The kernel unit tests (tests/test_kernels.py) compile kernels.c with these same flags, so that they
# check the code the module runs. -falign-loops=64: the short hot loops (the rank statistics' compare-
# exchange runs ~1200 times per block at K = 128) otherwise change speed by a few percent with wherever
# the linker happens to place them, i.e. with any unrelated edit of the C sources.
TENSOR_CFLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra", "-fvisibility=hidden",
                 "-falign-loops=64"]

tensor_module = Extension(
    "spirt.native.spirt_tensor",
    sources=["spirt/native/tensor.c", "spirt/native/kernels.c"],
    depends=["spirt/native/redismodule_api.h", "spirt/native/kernels.h"],
    extra_compile_args=TENSOR_CFLAGS,
    extra_link_args=[],
)

setup(ext_modules=[tensor_module])
