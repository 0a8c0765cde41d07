"""Studies: one comparison (models × inputs × initialisations × any flag) over the same subject-level folds.

Modules:
    spec      the study file: arms (grid expanded), common flags, checked before anything runs
    plan      the study folder, its folds, its cells (an arm on a fold = an ordinary run folder) and their markers
    engine    where cells run: Ray tasks (embedded local Ray or a cluster) or one after another; retries, progress
    results   each arm's out-of-fold and hold-out predictions, read back from its cells
    stats     paired tests: DeLong, McNemar, paired bootstrap, corrected resampled t-test, Holm; t intervals
    compare   per-arm summaries and every pairwise comparison (the numbers of the tables)
    kit       the paper kit: tables (csv, md, tex), methods.md, checklist.md, subgroup table
    report    all of it written into the study folder, with the study page (:mod:`octa3d.review.study`)

``--mode study`` (:mod:`octa3d.stages.study`) composes these with the stages that run each cell. The package
imports no report module itself: :mod:`octa3d.review.study` (the page) reads the formatting of
:mod:`~octa3d.studies.tables`, and :mod:`~octa3d.studies.report` writes that page.
"""

from octa3d.studies.engine import ExecOptions, Outcome, execute
from octa3d.studies.plan import Cell, build_cells
from octa3d.studies.spec import StudySpec, load_study

__all__ = ["Cell", "ExecOptions", "Outcome", "StudySpec", "build_cells", "execute", "load_study"]
