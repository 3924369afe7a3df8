"""Test and benchmark support: synthetic official model dirs and the official code as a reference.

Nothing here is imported by the runtime package. Modules that need torch or the
official code import them lazily and say what to install when they are absent.
"""
