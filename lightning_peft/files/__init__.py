"""Adapter files: reading, writing, checking and exporting them."""
