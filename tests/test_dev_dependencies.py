"""Tests of optional packages skip where the dev extra is missing, but fail under scripts/test.sh,
which installs it: a broken environment can't pass the suite by skipping."""

import pytest

from tests.conftest import REPO, dev_dependency, import_or_skip

MISSING = "arbor_titan_no_such_package"


def test_a_missing_package_skips_outside_the_suite_script(monkeypatch):
    monkeypatch.delenv("ARBOR_REQUIRE_DEV_DEPS", raising=False)
    assert dev_dependency(MISSING) is None
    with pytest.raises(pytest.skip.Exception, match=f"needs {MISSING}"):
        import_or_skip(MISSING)


def test_a_missing_package_fails_when_the_dev_extra_is_required(monkeypatch):
    monkeypatch.setenv("ARBOR_REQUIRE_DEV_DEPS", "1")
    for load in (dev_dependency, import_or_skip):
        with pytest.raises(ImportError, match=rf"{MISSING} is missing .*pip install -e \.\[dev\]"):
            load(MISSING)
    assert dev_dependency("json") is not None


def test_the_suite_script_requires_the_dev_extra():
    assert "export ARBOR_REQUIRE_DEV_DEPS=1" in (REPO / "scripts/test.sh").read_text()
