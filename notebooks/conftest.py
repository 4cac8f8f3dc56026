"""nbval add-on: a notebook cell that writes to stderr (warnings, stray progress bars) fails.

Warnings break a learner's trust, so the nbval run treats them as errors. A cell that must show
something on stderr on purpose can carry the tag ``allow-stderr``.
"""

from __future__ import annotations

import pytest

try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval not installed: nothing to add
    IPyNbCell = None

if IPyNbCell is not None and not getattr(IPyNbCell, "_quiet_stderr", False):
    _original_runtest = IPyNbCell.runtest

    def _runtest_without_stderr(self: IPyNbCell) -> None:
        _original_runtest(self)
        if "allow-stderr" in self.cell.get("metadata", {}).get("tags", []):
            return
        stderr = [o.get("text", "") for o in self.test_outputs or [] if o.get("name") == "stderr"]
        if stderr:
            pytest.fail("the cell wrote to stderr:\n" + "".join(stderr)[:2000], pytrace=False)

    IPyNbCell.runtest = _runtest_without_stderr
    IPyNbCell._quiet_stderr = True
