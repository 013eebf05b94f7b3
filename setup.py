"""Build configuration beyond pyproject.toml: the optional C kernels of the metric core.

``optional=True``: where no C compiler is found the install still succeeds and the metric core
uses its numpy code for the same results (docs/performance.md, "Compiled kernels").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "oarbench.metrics._ckernels",
            sources=["oarbench/metrics/_ckernels.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
