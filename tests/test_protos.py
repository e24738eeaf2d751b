"""The generated code in libs/common/src/herald is exactly what `make proto` produces."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    _generator().generate(tmp_path)
    fresh = _files(tmp_path / "herald")
    committed = _files(ROOT / "libs" / "common" / "src" / "herald")
    assert sorted(fresh) == sorted(committed), "run `make proto`: generated files differ"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    if stale:
        pytest.fail(f"run `make proto`: stale generated files {stale}")
