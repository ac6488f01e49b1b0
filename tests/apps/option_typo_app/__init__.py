"""A router package with a misspelt route option, for startup error reporting (issue 9, section 4)."""
