"""README.md, CONTRIBUTING.md and docs/*.md run and link as written."""
