"""tcpidle: find idle and dead TCP connections precisely and destroy them."""

__version__ = "0.1.0"
