"""The run log: Python warnings go to run.log only while the run's Log is open."""

from __future__ import annotations

import warnings

import pytest

from llmforge.runtime.metrics import Log


@pytest.fixture
def console(monkeypatch) -> list[str]:
    """Where Python shows a warning when nobody redirects it (stderr), recorded."""
    shown: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    return shown


def test_warnings_go_to_run_log_only_until_close(tmp_path, console):
    log = Log(tmp_path / "run.log")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        log.capture_warnings()
        warnings.warn("a library's deprecation", FutureWarning)
        log.close()
        warnings.warn("after the run", UserWarning)
    assert console == ["after the run"]
    assert "FutureWarning: a library's deprecation" in (tmp_path / "run.log").read_text()


def test_a_log_without_a_file_leaves_warnings_on_stderr(console):
    log = Log(None, enabled=False)  # ranks > 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        log.capture_warnings()
        warnings.warn("rank 1's", UserWarning)
        log.close()
    assert console == ["rank 1's"]
