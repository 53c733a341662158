"""Span names and attributes, the SQLite (SQLAlchemy) span exporter, and OTLP set-up."""
