"""Plumbing for the Japanese CLIP speed-up course (one module per concept).

Layers, from the plain ones up (``make lint`` checks them; docs/helpers.md draws them):
``env``/``timing``/``plots``/``latency``/``zeroshot`` → ``data`` → ``fixtures`` → ``models`` → ``dali``
→ ``engines``/``embeddings`` → ``engines_ray`` → the commands (``bench``, ``classify``, ``search``,
``tiny_clip``); ``tooling`` (repository tools) stands apart. Notebooks import ``helpers``; ``helpers``
never imports a notebook.
"""

from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
"""The repository checkout that holds this package (notebooks/, sample_images/, build/)."""

__all__ = ["REPO_ROOT"]
