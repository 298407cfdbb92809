"""Installs the pure-Python package.

The CUDA extension ``lorasc_kernels._C`` is added by :func:`cuda_extensions` (empty until
the CUDA backend lands). Building never probes hardware to choose dependencies.
"""

from setuptools import setup


def cuda_extensions():
    """Extension modules to build, and the build command class; none for now."""
    return [], {}


extensions, cmdclass = cuda_extensions()
setup(ext_modules=extensions, cmdclass=cmdclass)
