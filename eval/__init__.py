"""Frozen-feature evaluations: one script per downstream task, plus :mod:`eval.common`.

Every script exposes ``main(argv=None)`` and ``--help``; results are written as
``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md`` with plots next to them.
"""
