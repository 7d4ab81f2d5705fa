"""Builds the in-database tensor module (a Redis/Valkey module, plain C shared object).

It is declared as an Extension so that both `pip install .` and `pip install -e .` compile it with the
platform's C compiler; it is never imported by Python, only loaded by the database server with
`--loadmodule`.
"""

from setuptools import Extension, setup

tensor_module = Extension(
    "spirt.native.spirt_tensor",
    sources=["spirt/native/tensor.c"],
    depends=["spirt/native/redismodule_api.h"],
    extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra", "-fvisibility=hidden"],
    extra_link_args=[],
)

setup(ext_modules=[tensor_module])
