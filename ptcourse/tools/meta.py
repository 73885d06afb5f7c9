"""The one place that names the course's repository and the release the notebooks install.

The README's Colab links and the install line in the first cell of every notebook are generated
from (and tested against) these constants. Both name the same git tag, ``v<version>`` from
``ptcourse.__version__``, so a notebook opened on Colab installs the library it was written
against. A release bumps ``__version__`` and tags the commit; a fork changes ``REPO``.
"""
from .. import __version__

REPO = "ptcourse/ptcourse"
REPO_URL = f"https://github.com/{REPO}"
REF = f"v{__version__}"
PIP_SPEC = f"ptcourse @ git+{REPO_URL}@{REF}"


def colab_url(notebook_path: str) -> str:
    """Open-in-Colab address of a notebook at this release, e.g. ``chapters/00_getting_started.ipynb``."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{REF}/{notebook_path}"


SETUP_CELL = f'''# Setup: on Colab this installs the course package (the release this notebook belongs to);
# elsewhere it does nothing.
import sys
if "google.colab" in sys.modules:
    %pip install -q "{PIP_SPEC}"
import ptcourse
P = ptcourse.profile()
print(P)'''
