"""The package version, in one place: read by setuptools at build time and exported as ``__version__``."""

__version__ = "0.1.0"
