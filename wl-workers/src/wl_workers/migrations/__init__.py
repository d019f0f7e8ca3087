"""Versioned SQL migrations of schema wl (NNNN_name.sql, applied in order, never edited once released)."""
