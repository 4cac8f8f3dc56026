"""Plumbing for the Japanese CLIP speed-up course (one module per concept).

Layers, from the plain ones up: ``env``, ``timing``, ``plots`` → ``data`` → ``models``/``tiny_clip``.
Notebooks import ``helpers``; ``helpers`` never imports a notebook.
"""

from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
"""The repository checkout that holds this package (notebooks/, sample_images/, build/)."""

__all__ = ["REPO_ROOT"]
