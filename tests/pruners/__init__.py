"""Strategies on plain tensors: the contract of every registered method, each method against references, and
the ``Selection`` / budget / ``vtok.compress`` API."""
