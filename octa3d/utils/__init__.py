"""Run folders, atomic I/O, seeding, logging and environment capture."""
