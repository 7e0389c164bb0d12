"""transition strategies (filled in by the strategies issue)."""
