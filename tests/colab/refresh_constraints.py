"""Regenerate ``tests/colab/constraints.txt`` from a saved copy of Colab's ``pip-freeze.gpu.txt``.

Colab publishes its package list in the public repository googlecolab/backend-info
(``pip-freeze.gpu.txt`` for the GPU runtime, ``os-info-gpu.txt`` for Ubuntu and Python). Save that
file, then::

    python tests/colab/refresh_constraints.py PATH/TO/pip-freeze.gpu.txt --date YYYY-MM-DD --colab-python X.Y

keeps the pins of the packages the course touches (and of their dependencies), writes the
constraints file with its source, date and the differences the CI machine cannot match, and exits 1
when a package the course relies on is no longer on Colab (the set-up cell must then install it).
Standard library only: it runs under any Python 3.11+.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTRAINTS: Path = HERE / "constraints.txt"
SOURCE = "googlecolab/backend-info, pip-freeze.gpu.txt"

ROOTS: tuple[str, ...] = (
    # the model layer
    "torch", "transformers", "huggingface-hub", "tokenizers", "safetensors", "sentencepiece", "protobuf",
    # data and plots
    "numpy", "pillow", "matplotlib", "tqdm", "ipywidgets",
    # the kernel that runs the notebooks, and the test runner (both on Colab too)
    "ipykernel", "ipython", "jupyter-client", "nbformat", "nbclient", "pytest",
)  # fmt: skip
"""The packages the course touches and expects Colab to have (canonical names)."""

DEPENDENCIES: tuple[str, ...] = (
    "annotated-doc", "anyio", "argon2-cffi", "argon2-cffi-bindings", "arrow", "attrs", "backcall",
    "beautifulsoup4", "bleach", "certifi", "cffi", "click", "contourpy", "cycler", "debugpy",
    "decorator", "defusedxml", "entrypoints", "fastjsonschema", "filelock", "fonttools", "fqdn",
    "fsspec", "h11", "hf-xet", "httpcore", "httpx", "idna", "iniconfig", "ipython-genutils",
    "isoduration", "jedi", "jinja2", "jsonpointer", "jsonschema", "jsonschema-specifications",
    "jupyter-core", "jupyter-events", "jupyter-server", "jupyter-server-terminals",
    "jupyterlab-pygments", "jupyterlab-widgets", "kiwisolver", "lark", "markdown-it-py",
    "markupsafe", "matplotlib-inline", "mdurl", "mistune", "mpmath", "nbclassic", "nbconvert",
    "nest-asyncio", "networkx", "notebook", "notebook-shim", "overrides", "packaging",
    "pandocfilters", "parso", "pexpect", "pickleshare", "platformdirs", "pluggy",
    "prometheus-client", "prompt-toolkit", "psutil", "ptyprocess", "pycparser", "pygments",
    "pyparsing", "python-dateutil", "python-json-logger", "pyyaml", "pyzmq", "referencing",
    "regex", "rfc3339-validator", "rfc3986-validator", "rfc3987-syntax", "rich", "rpds-py",
    "send2trash", "shellingham", "six", "soupsieve", "sympy", "terminado", "tinycss2", "tornado",
    "traitlets", "typer", "typing-extensions", "tzdata", "uri-template", "wcwidth", "webcolors",
    "webencodings", "websocket-client", "widgetsnbextension",
)  # fmt: skip
"""What pip installs for ROOTS with Colab's pins (``make test-colab`` checks the list is complete)."""

SUBSTITUTES: dict[str, tuple[str, str]] = {
    "torch": (
        "2.13.0",
        "the CPU wheel on the CI machines' disk; other torch builds are multi-GB CUDA downloads",
    ),
}
"""Packages pinned to another version than Colab's: name → (version used, why)."""

LEFT_OUT: dict[str, str] = {
    "torchvision": "does not import beside torch 2.13.0 CPU; the course does not use it",
    "timm": "imports torchvision; only the LINE model's remote code needs it (Colab and the GPU machine)",
    "setuptools": "torch 2.13.0 requires >=77.0.3; pip keeps a newer one than Colab's",
}
"""Packages on Colab that the CI machine cannot have at Colab's version: name → why."""

COURSE_INSTALLS: tuple[str, ...] = (
    "matplotlib-fontja", "nvidia-dali-cuda120", "ray", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript",
)  # fmt: skip
"""What the set-up cell installs because Colab lacks it (helpers.tooling.notebooks' packages, extras)."""

DEV_ONLY: tuple[str, ...] = ("jupyterlab", "nbval", "ruff", "import-linter", "faiss-cpu")
"""requirements.txt entries for local use and the main CI run; neither on Colab nor needed there
(faiss-cpu: only ``helpers.search --index ivf`` uses it, from 100,000 rows; it says how to install it)."""

NOT_ON_COLAB_MARK = "# not on Colab (pip picks the version):"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``typing_extensions`` → ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> dict[str, str]:
    """``pip freeze`` output → {canonical name: version}; comments, URLs and editable lines are skipped."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def render(colab: dict[str, str], date: str, colab_python: str) -> tuple[str, list[str]]:
    """The constraints file for Colab's pins ``colab``; also the ROOTS Colab no longer has."""
    missing = [name for name in ROOTS if name not in colab and name not in SUBSTITUTES]
    lines = [
        "# Colab's versions of the packages this course touches (pip requirements/constraints format).",
        f"# Source: {SOURCE}, {date} (Colab GPU runtime, Python {colab_python}).",
        "# Regenerate: python tests/colab/refresh_constraints.py PATH/TO/pip-freeze.gpu.txt"
        " --date YYYY-MM-DD --colab-python X.Y",
        "# `make test-colab` builds .venv-colab from exactly this file; the set-up cell then adds only",
        "# what Colab lacks (matplotlib-fontja; DALI or Ray for the notebooks that need them).",
        "#",
        "# Differences from Colab that the CI machine cannot match:",
        f"# - Python 3.11 (the CI machines' python3) instead of Colab's {colab_python}.",
    ]
    for name, (version, why) in SUBSTITUTES.items():
        lines.append(f"# - {name} {version} instead of Colab's {colab.get(name, '(none)')}: {why}.")
    for name, why in LEFT_OUT.items():
        lines.append(f"# - {name} (Colab: {colab.get(name, 'none')}) is not installed: {why}.")
    lines += ["", "# The packages the course touches"]
    for name in ROOTS:
        if name in SUBSTITUTES:
            lines.append(f"{name}=={SUBSTITUTES[name][0]}  # Colab: {colab.get(name, 'none')}")
        elif name in colab:
            lines.append(f"{name}=={colab[name]}")
    lines += ["", "# Their dependencies, at Colab's versions"]
    absent = []
    for name in sorted(DEPENDENCIES):
        if name in LEFT_OUT or name in ROOTS:
            continue
        if name in colab:
            lines.append(f"{name}=={colab[name]}")
        else:
            absent.append(name)
    if absent or missing:
        lines += ["", f"{NOT_ON_COLAB_MARK} {' '.join(sorted(absent + missing))}"]
    return "\n".join(lines) + "\n", missing


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("freeze", type=Path, help="a saved copy of Colab's pip-freeze.gpu.txt")
    parser.add_argument("--date", required=True, help="date of that copy (its commit date), YYYY-MM-DD")
    parser.add_argument("--colab-python", required=True, help="Colab's Python (os-info-gpu.txt), e.g. 3.13")
    parser.add_argument("--out", type=Path, default=CONSTRAINTS, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        parser.error(f"--date must look like 2026-08-19, got {args.date!r}")
    text, missing = render(
        parse_freeze(args.freeze.read_text(encoding="utf-8")), args.date, args.colab_python
    )
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    if missing:
        print(
            f"Colab no longer has: {', '.join(missing)}. The set-up cell must install them: add them to "
            "BASE_PACKAGES in helpers/notebooks.py (and to COURSE_INSTALLS here), then run "
            "`python -m helpers.tooling.notebooks sync`.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
