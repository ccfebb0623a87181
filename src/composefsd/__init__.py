"""composefsd: a composefs object repository, image builder and mounter served over Varlink."""

__version__ = "0.1.0"
