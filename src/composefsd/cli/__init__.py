"""Command-line front ends (C-compatible tools and composefsctl)."""
