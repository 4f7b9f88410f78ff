"""Make the test helpers in this folder importable (simulate, emulator)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import logging

logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
