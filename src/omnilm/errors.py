"""Exceptions shared by every stage."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the command's input: the CLI prints it without a traceback and exits with code 2."""
