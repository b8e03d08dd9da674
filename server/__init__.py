"""HTTP serving of a runtime.Pipeline: FastAPI app, micro-batcher, settings, metrics, web page."""

from server.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None, *, pipeline=None):
    # Imported on use: `import server` (for Settings) does not pull in FastAPI and torch.
    from server.app import create_app as _create_app

    return _create_app(settings, pipeline=pipeline)
