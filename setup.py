"""Everything about the package is in pyproject.toml; this file only adds the optional C part.

runtime/_jpegbands.c (see runtime/jpeg_bands.py) is a plain shared library over the system's
libjpeg(-turbo), loaded with ctypes. It needs a C compiler and libjpeg's headers (Debian:
`gcc libjpeg62-turbo-dev`); without them the build skips it (optional=True) and JPEGs are decoded
whole by simplejpeg, pixel for pixel the same, about a millisecond slower per photo.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime._jpegbands", ["runtime/_jpegbands.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
