"""Content-addressed blob store, the SSRF-safe URL fetcher, git mirrors and environments.

This package imports neither ``worker`` nor ``runtime``: callers pass plain data in.
"""
