"""``python -m ptcourse <command>``: the command line lives in :mod:`ptcourse.tools.cli`."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
