"""In-notebook answer checks for the exercises, one module per chapter.

Each ``check_<task>(student_fn)`` runs the student's function and the reference on several
random inputs and prints one friendly line: a pass, or what differs and a hint. It returns a
:class:`CheckResult` (truthy when it passed), so ``assert check_x(f)`` also works as an nbgrader
autograder test. A ``NotImplementedError`` from an unfinished stub is let through, so an exercise
notebook stops at the first task still to do.

The modules carry the chapters' names (``ptcourse.checks.bert_finetuning`` goes with
``chapters/03_bert_finetuning.ipynb``, ``ptcourse.chapters.bert_finetuning`` and
``tests/test_bert_finetuning.py``)::

    >>> from ptcourse.checks.contrastive_learning import check_nt_xent
    >>> check_nt_xent(my_nt_xent)
    ✅ check_nt_xent: matches the reference on 6 random inputs (values and gradients).

Writing a new check takes one call to :func:`compare`.
"""
from ._common import CheckResult, compare, difference, result

__all__ = ["CheckResult", "compare", "difference", "result"]
