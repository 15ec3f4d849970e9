"""Placeholder: filled by the backbone work (issue 2)."""
