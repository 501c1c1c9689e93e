"""Named errors of fedscdd; messages say what was wrong, what was expected and how to fix it.

Error text may travel from a site to the coordinator (Flower forwards ClientApp exception
text), so messages never contain expression values, cell ids or other per-cell data.
"""

from __future__ import annotations


class FedscddError(Exception):
    """Base class of every error fedscdd raises on purpose."""


class SiteDataError(FedscddError, ValueError):
    """A site's AnnData does not meet the data contract."""


class ConfigError(FedscddError, ValueError):
    """A configuration value is unknown or out of range."""


class ProtocolError(FedscddError, ValueError):
    """A federated message does not match its schema or the run's plan."""


class CheckpointError(FedscddError, ValueError):
    """A checkpoint file is missing, corrupt, or of another model kind."""
