"""Repository tools, used by no layer of :mod:`helpers`.

- ``python -m helpers.tooling.notebooks sync|check|outputs``: the Colab badge and set-up cell of every
  notebook, from one template (:mod:`helpers.tooling.notebooks`).
- ``python -m helpers.tooling.run_notebooks`` (``make run``): execute every notebook headless into
  ``build/notebooks/`` (:mod:`helpers.tooling.run_notebooks`).
"""
