"""How changes are read: each capture mode yields document versions in a position order."""
