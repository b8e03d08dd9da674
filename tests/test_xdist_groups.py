"""`make test` runs the suite in one process per core (pytest-xdist, --dist loadgroup), and the
tests that share a session export must run in one process (tests/conftest.py, SHARED_EXPORTS), or
each export is built once per process. pytest-xdist groups tests by suffixing their node ids with
"@group"; pytest 9.2 drops that suffix (pytest-xdist#1386) and the grouping is lost without an
error. This test fails when that happens in a grouped run."""

from __future__ import annotations

import pytest

from tests.conftest import export_group


@pytest.mark.xdist_group("grouping-check")
def test_tests_sharing_an_export_run_in_one_process(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a pytest-xdist --dist loadgroup worker: this run groups nothing")
    assert request.node.nodeid.endswith("@grouping-check"), (
        f"{request.node.nodeid}: pytest-xdist dropped the xdist_group mark (see the pytest pin in constraints.txt)")
    wrong = []
    for item in request.session.items:  # marked by tests/conftest.py's hook or by the test itself
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        want = export_group(item)
        in_one = len(groups) <= 1 and (want is None or groups == {want})
        if not in_one or not all(item.nodeid.endswith(f"@{g}") for g in groups):
            wrong.append(item.nodeid)
    assert wrong == []  # each in one group, the one its export needs, and xdist took the mark
