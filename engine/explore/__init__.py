"""The explorer's model (`layerdb explore`): layers, details, a lazily loaded file tree, history, diffs, search.

May import the foundation (engine/*.py), audit and output; no UI toolkit: the widgets live in cli/.
"""

from .model import Entry, Explorer, Row, TreeState

__all__ = ["Entry", "Explorer", "Row", "TreeState"]
