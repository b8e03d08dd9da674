"""Shared fixtures of the deploy tests: the repository's deploy files and the server's own
definitions (settings fields, routes, CLI), so every check compares against one source of truth."""

from __future__ import annotations

from types import ModuleType

import pytest
from deploy_support import load_renderer


@pytest.fixture(scope="session")
def renderer() -> ModuleType:
    return load_renderer()


# A server that does not import skips, each with the import error as its reason, only the tests
# that take one of the fixtures below; the rest of the deploy suite (lint, manifests, the GPU
# entrypoint, the built image) still runs.


@pytest.fixture(scope="session")
def settings_module():
    """server.settings, the source of truth for FRCNN_* names and the bundled demo checkpoint."""
    try:
        import server.settings as module
    except ImportError as e:
        pytest.skip(f"server.settings not importable: {e}")
    return module


@pytest.fixture(scope="session")
def settings_cls(settings_module):
    """server.settings.Settings: field names and defaults are the source of truth for FRCNN_* names."""
    return settings_module.Settings


@pytest.fixture(scope="session")
def settings_fields(settings_cls) -> dict:
    return settings_cls.model_fields


@pytest.fixture(scope="session")
def server_routes(settings_cls) -> dict[str, set[str]]:
    """{path: methods} of the app the server really builds (no model is loaded: that is lifespan work)."""
    try:
        from server.app import create_app
    except ImportError as e:
        pytest.skip(f"server.app not importable: {e}")
    app = create_app(settings_cls())
    routes: dict[str, set[str]] = {}
    for r in app.routes:  # the app's own routes (some are not in the schema, like the page at /)
        if hasattr(r, "path"):
            routes.setdefault(r.path, set()).update(getattr(r, "methods", None) or ())
    # routes of included routers appear only through the schema (FastAPI wraps them)
    for path, ops in app.openapi()["paths"].items():
        routes.setdefault(path, set()).update(m.upper() for m in ops)
    return routes


@pytest.fixture(scope="session")
def parse_server_args():
    """The server's own command-line parser: argv -> Settings (exits on an unknown option)."""
    try:
        from server.__main__ import parse_settings
    except ImportError as e:
        pytest.skip(f"server.__main__ not importable: {e}")
    return parse_settings


@pytest.fixture(scope="session")
def rendered(renderer) -> dict[str, list[dict]]:
    """Every kustomization (base, overlays) rendered by the built-in renderer, by name."""
    return {name: renderer.render_builtin(d) for name, d in renderer.kustomization_dirs().items()}
