"""Fixtures shared by every test package.

The real data lives next to the checkout, in ../shared/data (coco128, cocoeval-fake100); tests
that need it take `shared_data` and are skipped, with the reason, where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is not there."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (expected next to the checkout)")
    return data


@pytest.fixture(scope="session")
def coco128_images(shared_data: Path) -> list[Path]:
    """A few real COCO train2017 jpgs (sorted, so the same ones every run)."""
    images = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:4]
    if not images:
        pytest.skip(f"no coco128 images under {shared_data / 'coco128' / 'train2017'}")
    return images


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: golden files written by tools/make_golden_*.py."""
    return FIXTURES
