"""The command line: input errors are one line, exit status 2, before any heavy work."""

from __future__ import annotations

import pytest

from mpsearch.cli import main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["search", "--proxy", "nope"], "built-in proxies: baq, "),
        (["search", "--space", "nope"], "built-in spaces"),
        (["search", "--pin", "no-equals"], "NAME=VALUE"),
        (
            ["search", "--calibration", "austen:emma", "--evaluation", "austen:emma"],
            "never evaluate on calibration text",
        ),
        (["search", "--threads", "0"], "threads"),
        (["search", "--hessian-probes", "0"], "hessian_probes must be >= 1"),
    ],
)
def test_search_input_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("mpsearch search: error:")


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "milp" in out and "fisher" in out and "llama" in out
