"""Interfaces: command line, reports, training callbacks."""
