"""Drafters: propose token trees for the target to verify. See ``base.Drafter``."""
