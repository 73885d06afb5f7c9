"""Sphinx configuration of the course's website; ``python -m ptcourse book`` stages the sources and builds it.

The chapters are shown with the outputs stored in them (never executed here); formulas are typeset by
a MathJax copy served from the site itself; the repository's address comes from pyproject.toml.
"""
import os

from ptcourse.tools import meta

# the course folder being built (set by `python -m ptcourse book --root`); default: this checkout
REPOSITORY = meta.repository_url(os.environ.get("PTCOURSE_BOOK_ROOT"))

project = "ptcourse"
author = "the ptcourse authors"
html_title = "Pretraining and fine-tuning with PyTorch"
extensions = ["myst_nb", "sphinx.ext.mathjax", "sphinx-mathjax-offline"]
exclude_patterns = ["README.md", "_build"]
suppress_warnings = ["myst.header"]       # the chapters' "What we measured" cells are H4 under an H2

nb_execution_mode = "off"                 # show the outputs the chapters carry; run nothing
nb_merge_streams = True
nb_ipywidgets_js = {}                     # no widget manager fetched from a CDN (recorded chapters carry none)
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
mathjax_path = "mathjax/tex-chtml.js"     # copied into _static by sphinx-mathjax-offline

html_theme = "sphinx_book_theme"
html_sourcelink_suffix = ""               # _sources/chapters/NN.ipynb is the notebook itself ("download")
html_theme_options = {
    "repository_url": REPOSITORY,
    "repository_branch": meta.REF,        # Colab opens the release the notebooks install
    "path_to_docs": "",
    "use_repository_button": True,
    "use_download_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "home_page_in_toc": True,
}
