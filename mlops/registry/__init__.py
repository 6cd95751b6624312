"""Releases, stage pointers and routing, on a store (local directory or S3)."""
