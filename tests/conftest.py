import os

# Tests never join a Ray cluster they did not start.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
