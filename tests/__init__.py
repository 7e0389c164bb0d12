"""vtok's test suite: one folder per area, shared helpers in ``tests.helpers`` (see CONTRIBUTING.md)."""
