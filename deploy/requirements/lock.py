"""Write the images' lock files, deploy/requirements/<image>.txt, from one source.

    .venv/bin/python deploy/requirements/lock.py [IMAGE ...]     (all images by default)
    .venv/bin/python deploy/requirements/lock.py --check         (exit 1 if a lock is stale)

The source is images.toml (which packages each image installs, for which Python and
glibc) with the exact pins of pyproject.toml [project.dependencies]; every other package
takes the version of the development lock, requirements.lock, so the images run what the
tests run (images.toml names the deliberate differences). Each set is resolved
by uv (pinned in the test extra) for the image's own Python and platform, with the
sha256 of every file of every pinned version, so `pip install --require-hashes` installs
nothing else. torch's CPU build (export image) is found through PIP_FIND_LINKS or
--find-links (download.pytorch.org/whl/cpu serves it; the Dockerfile names that index).

Each lock starts with the sha256 of its input; `--check` (and tests/deploy) recompute
it without the network, so a changed pin that was not locked again fails a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SOURCE = HERE / "images.toml"
PYPROJECT = REPO_ROOT / "pyproject.toml"
DEV_LOCK = REPO_ROOT / "requirements.lock"
SOURCE_LINE = re.compile(r"^# input sha256: ([0-9a-f]{64})$", re.M)


def canonical(name: str) -> str:
    """PEP 503 normalised name, extras dropped."""
    return re.sub(r"[-_.]+", "-", name.split("[", 1)[0]).lower()


def project_pins(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """{normalised name: requirement with its exact pin} from pyproject.toml."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        name = re.split(r"[=<>!~ ;]", dep, 1)[0]
        out[canonical(name)] = dep
    return out


def images(source: Path = SOURCE) -> dict[str, dict]:
    return tomllib.loads(source.read_text())


def requirements(image: str, source: Path = SOURCE, pyproject: Path = PYPROJECT) -> list[str]:
    """The image's top-level requirements, each with an exact pin."""
    pins = project_pins(pyproject)
    out = []
    for entry in images(source)[image]["packages"]:
        if "==" in entry:
            out.append(entry)
            continue
        base = pins.get(canonical(entry))
        if base is None:
            raise SystemExit(f"{source.name} [{image}]: {entry!r} has no pin here or in pyproject.toml")
        # keep the extras written in images.toml, the version from pyproject.toml
        version = base.split("==", 1)[1]
        out.append(f"{entry}=={version}")
    return out


def explicit(image: str, source: Path = SOURCE) -> set[str]:
    """Packages whose pin images.toml writes itself (deliberate differences)."""
    return {canonical(e.split("==", 1)[0]) for e in images(source)[image]["packages"] if "==" in e}


def constraints(image: str, dev_lock: Path = DEV_LOCK) -> dict[str, str]:
    """{name: version} the image must share with the development lock: every package
    of requirements.lock that images.toml does not pin itself."""
    skip = explicit(image)
    return {k: v for k, v in locked_versions(dev_lock).items() if k not in skip}


def input_digest(image: str, source: Path = SOURCE, pyproject: Path = PYPROJECT) -> str:
    spec = images(source)[image]
    blob = json.dumps({"image": image, "python": spec["python"], "glibc": spec["glibc"],
                       "requirements": requirements(image, source, pyproject)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def lock_path(image: str) -> Path:
    return HERE / f"{image}.txt"


def locked_digest(image: str) -> str | None:
    path = lock_path(image)
    if not path.exists():
        return None
    m = SOURCE_LINE.search(path.read_text())
    return m.group(1) if m else None


def locked_versions(path: Path) -> dict[str, str]:
    """{normalised name: version} of a lock file."""
    return {canonical(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==(\S+)", path.read_text(), re.M)}


def uv_binary() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("uv is not installed: `make venv` installs the test extra (uv==0.13.8)")
    return found


def find_links(extra: list[str]) -> list[str]:
    links = list(extra)
    for item in os.environ.get("PIP_FIND_LINKS", "").split():
        if item not in links:
            links.append(item)
    return links


def lock(image: str, links: list[str]) -> Path:
    spec = images()[image]
    reqs = requirements(image)
    with tempfile.TemporaryDirectory() as tmp:
        infile = Path(tmp) / f"{image}.in"
        infile.write_text("\n".join(reqs) + "\n")
        outfile = Path(tmp) / f"{image}.txt"
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("".join(f"{k}=={v}\n" for k, v in sorted(constraints(image).items())))
        cmd = [uv_binary(), "pip", "compile", "--no-config", "--quiet", "--no-header",
               "--generate-hashes",
               "--python-version", spec["python"],
               "--python-platform", f"x86_64-manylinux_{spec['glibc'].replace('.', '_')}",
               "--constraint", str(cfile), "--output-file", str(outfile), str(infile)]
        for link in links:
            cmd[3:3] = ["--find-links", link]
        subprocess.run(cmd, check=True)
        body = (outfile.read_text().replace(str(infile), f"images.toml [{image}]")
                .replace(str(cfile), "requirements.lock"))
    header = [
        f"# {image}: generated by deploy/requirements/lock.py from images.toml and pyproject.toml; do not edit.",
        f"# Python {spec['python']}, x86_64 manylinux up to glibc {spec['glibc']}.",
        f"# Install: pip install --no-deps --require-hashes --only-binary=:all: -r {image}.txt",
        f"# input sha256: {input_digest(image)}",
        "",
    ]
    path = lock_path(image)
    path.write_text("\n".join(header) + body)
    return path


def stale(names: list[str]) -> list[str]:
    return [n for n in names if locked_digest(n) != input_digest(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="images to lock (default: all of images.toml)")
    parser.add_argument("--check", action="store_true", help="only say which locks are stale (exit 1)")
    parser.add_argument("--find-links", action="append", default=[],
                        help="extra wheel directory or URL (PIP_FIND_LINKS is added too)")
    args = parser.parse_args(argv)
    names = args.images or list(images())
    unknown = set(names) - set(images())
    if unknown:
        parser.error(f"unknown images {sorted(unknown)}; images.toml has {sorted(images())}")
    if args.check:
        bad = stale(names)
        for name in bad:
            print(f"{lock_path(name).relative_to(REPO_ROOT)} is stale: run deploy/requirements/lock.py {name}")
        return 1 if bad else 0
    for name in names:
        path = lock(name, find_links(args.find_links))
        print(f"{path.relative_to(REPO_ROOT)}: {len(locked_versions(path))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
