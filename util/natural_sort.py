"""Names in natural order: their numbers compared as numbers (frame_2 before frame_10, site2 before site10)."""
import re


def natural_key(name):
    """Names compared with their numbers as numbers: frame_2 before frame_10."""
    return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in re.split(r'(\d+)', name)]
