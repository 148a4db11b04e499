"""Snapshots as objects of their own, and forks made from them (``docs/snapshots.md``)."""
