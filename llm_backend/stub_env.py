"""What the Triton Python stub's environment must hold, checked when a model loads.

The nvidia-pytriton wheel (the CPU path's tritonserver and stub) declares numpy<2. Under
numpy 2.5.2 its stub crashed on a request's first text input, in
`triton_python_backend_utils.deserialize_bytes_tensor` (a length read as 0x05050505:
docs/bench-results/gpu-engine-20261130.md), which killed the stub, and the adapter's
reloads looped. A load refused with the reason is the clearer failure.
"""

from __future__ import annotations

from importlib import metadata

STUB_PACKAGE = "nvidia-pytriton"


def numpy_problem(numpy_version: str, stub_requires: list[str], stub_version: str = "") -> str | None:
    """Why `numpy_version` does not meet the stub package's own numpy requirement, or None."""
    from packaging.requirements import Requirement

    for line in stub_requires:
        req = Requirement(line)
        if req.name == "numpy" and req.marker is None and not req.specifier.contains(numpy_version, prereleases=True):
            return (f"numpy {numpy_version} is installed, but {STUB_PACKAGE} {stub_version}, whose Triton Python "
                    f"stub runs this model, requires numpy{req.specifier} (under numpy 2.5.2 the stub crashed on "
                    f"the first text input); install numpy{req.specifier}")
    return None


def check_stub_environment() -> str | None:
    """`numpy_problem` for this environment; None where the stub package is not installed
    (a Triton release's own stub, as in the GPU image)."""
    try:
        requires = metadata.requires(STUB_PACKAGE) or []
        stub_version = metadata.version(STUB_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    return numpy_problem(metadata.version("numpy"), requires, stub_version)
