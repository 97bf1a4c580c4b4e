"""Session-scoped, lazily built qcow2 images (see imagegen.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.qcow2.imagegen import Case, to_raw

Built = Callable[[Case], tuple[Path, Path]]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``built(case)`` -> (image path, qemu-made raw copy); each image and
    each raw copy is made once per session, only when a test asks for it."""
    images: dict[object, Path] = {}
    raws: dict[tuple[object, str | None], Path] = {}

    def get(case: Case) -> tuple[Path, Path]:
        if case.build not in images:
            images[case.build] = case.build(tmp_path_factory.mktemp(case.name))
        img = images[case.build]
        key = (case.build, case.snapshot)
        if key not in raws:
            raws[key] = to_raw(img, img.parent / f"{case.snapshot or 'active'}.raw", case.snapshot)
        return img, raws[key]

    return get
