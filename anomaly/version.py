"""The package version (``anomaly.__version__``), in a module of its own so that code inside the
package can read it without importing the package's lazy facade."""

__version__ = "0.1.0"
