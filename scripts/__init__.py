"""vtok's maintenance scripts (not part of the installed package), run from the repository root as modules."""
