"""Recording the answers of a split scan's workers (tests' helper)."""

from __future__ import annotations

from typing import Any

import pytest

from composefsd.sources import directory as directory_mod

__all__ = ["record_subtree_scans"]


def record_subtree_scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The answer of every worker a split scan starts from now on (None: none)."""
    out: list[object] = []
    real = directory_mod._SubtreeScan.result

    def recording(self: Any) -> Any:
        answer = real(self)
        out.append(answer)
        return answer

    monkeypatch.setattr(directory_mod._SubtreeScan, "result", recording)
    return out
