"""What every stage shares: the deploy-time Lily layer, model/adapter/checkpoint loading, data
reading, the one user-error type and atomic file I/O.

Core depends only on the custom op (``lily_deploy.converters``); stages, the runtime layer and
calibration build on it, never the other way round.
"""

__version__ = "0.1.0"
