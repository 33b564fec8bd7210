"""Model-directory layout: staging, numbered versions, atomic publish, config.pbtxt.

A polling `tritonserver` must never see a half-written version, and a failed
export must leave nothing behind. Everything is built in a hidden staging
directory inside the model directory (same file system, so the final step is a
single `rename`), and config.pbtxt is replaced atomically just before that.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llm_backend.model_config import EngineParams, render_config_pbtxt

STAGING_PREFIX = ".tmp-export-"


def versions(model_dir: Path) -> list[int]:
    """Published version numbers of a model directory, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@contextmanager
def staging(model_dir: Path) -> Iterator[Path]:
    """A fresh staging directory inside `model_dir`, removed on exit whatever happens.

    If the model directory did not exist and nothing got published, it is removed too.
    """
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(model_dir)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                model_dir.rmdir()  # only succeeds when nothing was published
            except OSError:
                pass


def remove_abandoned_staging(model_dir: Path) -> None:
    """Remove staging directories of exporters that were killed (their pid is gone)."""
    for path in model_dir.glob(STAGING_PREFIX + "*"):
        try:
            pid = int(path.name[len(STAGING_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge


def write_config(model_dir: Path, name: str, params: EngineParams, *, instance_kind: str,
                 instance_count: int = 1) -> Path:
    """Render config.pbtxt and replace it atomically; unchanged content is left untouched
    (so a polling server does not reload for nothing)."""
    text = render_config_pbtxt(name, params, instance_kind=instance_kind, instance_count=instance_count)
    path = model_dir / "config.pbtxt"
    # Which versions a (re)started Triton loads is llm-deploy's decision: a new export
    # keeps it, so the new version waits for its promotion.
    policy = version_policy_line(path.read_text()) if path.exists() else None
    if policy:
        text += policy + "\n"
    return _replace(path, text)


def _replace(path: Path, text: str) -> Path:
    if path.exists() and path.read_text() == text:
        return path
    fd, tmp = tempfile.mkstemp(prefix=".config.pbtxt.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


_POLICY = re.compile(r"^version_policy\b.*$", re.M)


def version_policy_line(text: str) -> str | None:
    m = _POLICY.search(text)
    return m.group(0) if m else None


def set_served_versions(model_dir: Path, versions: list[int]) -> Path:
    """Make config.pbtxt name the versions Triton loads at start (atomically), so a
    restarted server serves what llm-deploy put in service, not the newest export."""
    path = model_dir / "config.pbtxt"
    text = _POLICY.sub("", path.read_text()).rstrip("\n") + "\n"
    listed = ", ".join(str(v) for v in sorted(set(versions)))
    return _replace(path, text + f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}\n")


def publish_version(staged_version: Path, model_dir: Path) -> Path:
    """Rename a finished staging directory to the next free version number."""
    os.chmod(staged_version, 0o755)
    while True:
        number = (versions(model_dir) or [0])[-1] + 1
        target = model_dir / str(number)
        try:
            # rename() onto an existing non-empty directory fails (ENOTEMPTY/EEXIST):
            # another exporter won the number; take the next one.
            if target.exists():
                continue
            os.rename(staged_version, target)
            return target
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (cheap, same bytes) or copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
