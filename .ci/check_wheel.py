"""CI: the wheel carries exactly the package's files, with their content.

``asyncworker.middlewares`` is the top-level ``middlewares/`` folder, reached
through the symlink ``asyncworker/middlewares -> ../middlewares``.  A wheel
built from a tree where the link was not followed, or from a ``build/`` folder
holding files since deleted, would install a package that imports in the
source tree and fails in production.  So: every file under ``asyncworker/``
(through the link) must be in the wheel with the same bytes, and the wheel must
carry no other file of the package.

Usage: ``python .ci/check_wheel.py dist/asyncworker-*.whl`` from the project root.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PACKAGE = "asyncworker"


def source_files(root: Path) -> dict[str, bytes]:
    """The package's files as the wheel should name them, symlinks followed."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*")):
        # rglob does not descend into a symlinked folder: walk it explicitly below.
        if path.is_file() and "__pycache__" not in path.parts:
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    link = root / PACKAGE / "middlewares"
    if link.is_symlink():
        for path in sorted(link.resolve().rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                name = f"{PACKAGE}/middlewares/{path.relative_to(link.resolve()).as_posix()}"
                found[name] = path.read_bytes()
    return found


def main(wheel: str) -> int:
    expected = source_files(Path.cwd())
    with zipfile.ZipFile(wheel) as archive:
        carried = {
            name: archive.read(name)
            for name in archive.namelist()
            if name.startswith(f"{PACKAGE}/") and not name.endswith("/")
        }
    problems = [f"missing from the wheel: {name}" for name in sorted(expected.keys() - carried)]
    problems += [
        f"in the wheel, not in the tree: {name}" for name in sorted(carried.keys() - expected)
    ]
    problems += [
        f"differs from the tree: {name}"
        for name in sorted(expected.keys() & carried.keys())
        if expected[name] != carried[name]
    ]
    if f"{PACKAGE}/middlewares/__init__.py" not in carried:
        problems.append(f"the wheel has no {PACKAGE}/middlewares/__init__.py")
    for problem in problems:
        print(f"check_wheel: {problem}", file=sys.stderr)
    if problems:
        print(
            f"check_wheel: {wheel} does not match the source tree: rebuild it from a clean tree "
            "(rm -rf build) and check [tool.setuptools] in pyproject.toml",
            file=sys.stderr,
        )
        return 1
    print(f"check_wheel: {Path(wheel).name} carries the {len(carried)} files of {PACKAGE}/")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
