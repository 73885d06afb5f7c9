"""Command line: ``python -m ptcourse doctor | selftest | results | download | run | exercises | book | fork``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptcourse",
                                     description="Helpers for the pretraining & fine-tuning course.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, device, precision, profile, caches and warnings")
    st = sub.add_parser("selftest", help="train a tiny model through every path this device offers (pass/fail table)")
    st.add_argument("--no-ddp", action="store_true", help="skip the multi-process (DDP) check")
    res = sub.add_parser("results", help="print every recorded chapter result as a table")
    res.add_argument("--dir", default=None, help="results folder (default: PTCOURSE_RESULTS or ./results)")
    res.add_argument("--root", default=".", help="the course folder holding chapters/ (default: .)")
    res.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    res.add_argument("--update-readme", metavar="FILE", nargs="+",
                     help="regenerate the results/times tables in these files (README.md docs/instructors.md)")
    res.add_argument("--update-notebooks", action="store_true",
                     help="fill the chapters' 'What we measured' cells from the records")
    dl = sub.add_parser("download", help="fill the dataset and weight caches (idempotent; verifies)")
    dl.add_argument("names", nargs="*", help="datasets / model ids (default: all a profile needs)")
    dl.add_argument("--all", action="store_true", help="everything any profile needs")
    dl.add_argument("--profile", default=None, help="smoke, cpu or gpu (default: this machine's)")
    run = sub.add_parser("run", help="execute notebooks headlessly and print a summary table")
    run.add_argument("notebooks", nargs="*", help="notebook paths or chapter numbers (default: all)")
    run.add_argument("--profile", default=None, help="smoke, cpu or gpu (default: this machine's)")
    run.add_argument("--out", default="runs", help="folder for executed copies and status (default: runs/)")
    run.add_argument("--force", action="store_true", help="rerun notebooks that passed before")
    run.add_argument("--root", default=".", help="the course folder holding chapters/ and solutions/")
    run.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    run.add_argument("--record", action="store_true",
                     help="publish chapters: write each executed notebook back with its outputs and its record "
                          "into results/, tied by the hash of its code (see ptcourse.tools.published)")
    bk = sub.add_parser("book", help="build the course website (chapters with their outputs) into build/site/")
    bk.add_argument("--root", default=".", help="the course folder (default: .)")
    bk.add_argument("--out", default=None, help="output folder (default: ROOT/build/site)")
    fk = sub.add_parser("fork", help="point the Colab links, install cells and website at your fork of the course")
    fk.add_argument("repository", help="OWNER/NAME on GitHub (or https://github.com/OWNER/NAME)")
    fk.add_argument("--root", default=".", help="the course folder (default: .)")
    ex = sub.add_parser("exercises", add_help=False,
                        help="build | check | nbgrader: exercises/ and nbgrader sources from solutions/")
    ex.add_argument("rest", nargs=argparse.REMAINDER, help="see: python -m ptcourse exercises --help")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["exercises"]:  # the generator has its own arguments (build | check | nbgrader ...)
        from . import exercises
        return exercises.main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from .doctor import doctor
        doctor()
        return 0
    if args.command == "selftest":
        from .selftest import selftest
        return 0 if selftest(ddp=not args.no_ddp) else 1
    if args.command == "book":
        from .book import build
        build(args.root, args.out)
        return 0
    if args.command == "fork":
        from .meta import fork
        changed = fork(args.repository, args.root)
        print(f"{len(changed)} file(s) now name {args.repository}" + "".join(f"\n  {p}" for p in changed))
        return 0
    if args.command == "results":
        from ..results import results_table
        from .sync import sync_notebooks, sync_readme
        if args.update_notebooks:
            stale = sync_notebooks(args.root, args.dir)
            print("chapters: " + ("updated " + ", ".join(p.name for p in stale) if stale else "already up to date"))
        for path in args.update_readme or []:
            same = sync_readme(path, args.dir)
            print(f"{path}: " + ("already up to date" if same else "tables updated"))
        if args.update_notebooks or args.update_readme:
            return 0
        print(results_table(args.dir, markdown=args.markdown))
        return 0
    from ..runtime import profile
    from . import lab
    prof = args.profile or profile().name
    if prof not in lab.DATASETS_FOR:
        parser.error(f"--profile must be one of {', '.join(lab.DATASETS_FOR)}")
    if args.command == "download":
        names = args.names
        if args.all:
            names = sorted(set(lab.DATASETS_FOR["gpu"])) + lab.HF_MODELS_FOR["gpu"] + lab.TORCHVISION_WEIGHTS
        rows = lab.download(names, prof)
        width = max(len(r[0]) for r in rows)
        for name, kind, status, where in rows:
            print(f"{name:{width}s}  {kind:19s} {status:10s} {where}")
        missing = [r for r in rows if r[2] not in ("present", "downloaded")]
        if missing:
            print(f"\n{len(missing)} item(s) missing or damaged: " + ", ".join(r[0] for r in missing))
        return 1 if missing else 0
    if args.command == "run":
        root = Path(args.root).resolve()
        try:
            notebooks = lab.find_notebooks(root, args.notebooks)
            if args.record and not args.notebooks:
                notebooks = [p for p in notebooks if p.parent.name == "chapters"]
        except FileNotFoundError as err:
            print(err)
            return 2
        if args.record:
            from .published import RecordError, record
            failed = 0
            for path in notebooks:
                try:
                    record(path, prof, root=root, out_dir=args.out, timeout=args.timeout)
                except RecordError as err:
                    print(err)
                    failed += 1
            return 1 if failed else 0
        rows = lab.run_notebooks(notebooks, prof, Path(args.out), force=args.force, timeout=args.timeout)
        print()
        print(lab.summary(rows, Path(args.out) / "results"))
        return 1 if any(r["status"] != "passed" for r in rows) else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
