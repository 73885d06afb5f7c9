"""Command line: ``python -m ptcourse doctor | results``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptcourse",
                                     description="Helpers for the pretraining & fine-tuning course.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, device, precision, profile, caches and warnings")
    res = sub.add_parser("results", help="print every recorded chapter result as a table")
    res.add_argument("--dir", default=None, help="results folder (default: PTCOURSE_RESULTS or ./results)")
    res.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from .doctor import doctor
        doctor()
        return 0
    if args.command == "results":
        from .report import results_table
        print(results_table(args.dir, markdown=args.markdown))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
