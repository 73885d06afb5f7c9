"""The one place that names the course's repository.

Badges in the README, the Colab links and the install line in the first cell of every
notebook are generated from (and tested against) these constants, so a fork changes one line.
"""

REPO = "ptcourse/ptcourse"
REPO_URL = f"https://github.com/{REPO}"
BRANCH = "main"
PIP_SPEC = f"ptcourse @ git+{REPO_URL}@{BRANCH}"


def colab_url(notebook_path: str) -> str:
    """Open-in-Colab address of a notebook in the repository, e.g. ``chapters/00_getting_started.ipynb``."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{notebook_path}"


SETUP_CELL = f'''# Setup: on Colab this installs the course package; elsewhere it does nothing.
import sys
if "google.colab" in sys.modules:
    %pip install -q "{PIP_SPEC}"
import ptcourse
P = ptcourse.profile()
print(P)'''
