"""Work in progress (issue #19)."""
