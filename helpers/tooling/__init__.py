"""Repository tools, used by no layer of :mod:`helpers`.

- ``python -m helpers.tooling.notebooks sync|check|outputs``: the Colab badge and set-up cell of every
  notebook, from one template with per-notebook extras (:mod:`helpers.tooling.notebooks`); ``check``
  also holds every ``#@save`` cell to its module (:mod:`helpers.tooling.saved_cells`).
- ``python -m helpers.tooling.workshop``: each notebook's reading time, core and 発展, and where it
  leaves the course pattern; the instructor's timetable (:mod:`helpers.tooling.workshop`).
- ``python -m helpers.tooling.run_notebooks`` (``make run``): execute every notebook headless into
  ``build/notebooks/`` (:mod:`helpers.tooling.run_notebooks`).
"""
