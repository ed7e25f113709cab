"""The generation subprocess: `python -m runner ...` (DESIGN.md section 4).

Only this package imports torch; the web service starts it and reads its JSON-lines events.
"""
