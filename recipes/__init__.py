"""Recipes shipped with the package; use them by name: `tinyclip-edge compress quickstart`."""
