"""Checks run against an official ACE-Step 1.5 checkout in the image's environment (`make official-check`).

Nothing here is imported by the service or the runner: these modules import the checkout's own
code (given by path at run time), which is never copied into this repository."""
