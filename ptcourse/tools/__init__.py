"""Maintainer and lab tooling, apart from what students import.

``doctor`` (the environment check), ``lab`` (``download`` / ``run``: fill caches, execute notebooks),
``published`` (``run --record``: chapters published with the outputs of their recorded run, and the
checks that tie the two), ``exercises`` (builds ``exercises/`` from ``solutions/``), ``sync`` (the
results tables generated into the README and the chapters), ``meta`` (the repository, the release,
the notebooks' install cell; ``fork``), ``book`` (the course website). All are run through
``python -m ptcourse <command>``.
"""
