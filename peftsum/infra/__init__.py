"""Plumbing: files written atomically, the run folder's layout, the folder lock, signals and several processes."""
