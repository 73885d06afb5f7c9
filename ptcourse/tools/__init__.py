"""Maintainer and lab tooling, apart from what students import.

``doctor`` (the environment check), ``lab`` (``download`` / ``run``: fill caches, execute notebooks),
``exercises`` (builds ``exercises/`` from ``solutions/``), ``sync`` (the results tables generated
into the README and the chapters), ``meta`` (the repository, the release and the notebooks' install
cell). All are run through ``python -m ptcourse <command>``.
"""
