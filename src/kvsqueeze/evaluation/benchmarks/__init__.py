"""Every benchmark `kvsqueeze eval` knows, one file each, registered by name."""

from . import needle_grid  # noqa: F401
