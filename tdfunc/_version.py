"""The package version, read by the build backend (pyproject.toml) and by ``tdfunc.__version__``."""

__version__ = "0.1.0"
