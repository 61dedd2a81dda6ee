"""Audits over the event log: `diff`, `history --changes`, `find`, `waste` and `log`.

May import the foundation (engine/*.py: store, replay, tree, reader, paths, ...) only.
"""

from .diffs import changes, classify, compare_views, diff, diff_stat, iter_changes, iter_diff
from .search import find, find_path_query, path_filter
from .timeline import add_patches, log, log_all, patch, version_contents
from .wasted import waste, waste_failures

__all__ = ["add_patches", "changes", "classify", "compare_views", "diff", "diff_stat", "find", "find_path_query",
           "iter_changes", "iter_diff", "log", "log_all", "patch", "path_filter", "version_contents", "waste",
           "waste_failures"]
