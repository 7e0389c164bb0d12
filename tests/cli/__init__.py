"""The vtok command, the demos, and every script's documented entry point."""
