"""Stand-in for Colab's ``google.colab`` package, for ``make test-colab`` only.

The set-up cell and ``helpers.env.in_colab()`` take their Colab branch when ``google.colab`` can be
imported; the parity tests put this folder's parent on the kernel's ``PYTHONPATH`` to get there.
``google`` is left a namespace package so that it merges with ``google.protobuf`` and friends.
"""
