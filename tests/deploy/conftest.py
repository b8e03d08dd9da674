"""Shared fixtures of the deploy tests: the repository's deploy files and the server's own
definitions (settings fields, routes, CLI), so every check compares against one source of truth."""

from __future__ import annotations

from types import ModuleType

import pytest
from deploy_support import load_renderer


@pytest.fixture(scope="session")
def renderer() -> ModuleType:
    return load_renderer()


@pytest.fixture(scope="session")
def settings_cls():
    """server.settings.Settings: field names and defaults are the source of truth for FRCNN_* names."""
    try:
        from server.settings import Settings
    except ImportError as e:
        pytest.skip(f"server not importable: {e}")
    return Settings


@pytest.fixture(scope="session")
def settings_fields(settings_cls) -> dict:
    return settings_cls.model_fields


@pytest.fixture(scope="session")
def server_routes(settings_cls) -> dict[str, set[str]]:
    """{path: methods} of the app the server really builds (no model is loaded: that is lifespan work)."""
    try:
        from server.app import create_app
    except ImportError as e:
        pytest.skip(f"server not importable: {e}")
    app = create_app(settings_cls())
    return {r.path: set(getattr(r, "methods", None) or ()) for r in app.routes}


@pytest.fixture(scope="session")
def parse_server_args():
    """The server's own command-line parser: argv -> Settings (exits on an unknown option)."""
    try:
        from server.__main__ import parse_settings
    except ImportError as e:
        pytest.skip(f"server not importable: {e}")
    return parse_settings


@pytest.fixture(scope="session")
def rendered(renderer) -> dict[str, list[dict]]:
    """Every kustomization (base, overlays) rendered by the built-in renderer, by name."""
    return {name: renderer.render_builtin(d) for name, d in renderer.kustomization_dirs().items()}
