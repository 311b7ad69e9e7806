"""Thin setuptools entry: every setting (metadata, dependencies, extras, the shipped configs) is in pyproject.toml."""
from setuptools import setup

setup()
