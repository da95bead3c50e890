"""Placeholder: filled in by its stage's issue."""


def register(subparsers):
    pass
