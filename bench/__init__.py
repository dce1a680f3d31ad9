"""``make bench``: presque's benchmark against a raw-Redis baseline measured in the same run.

Entry point: ``bench/run.py``. The broker and ``redis-server`` run as their own processes; every
load generator runs in other processes, so the figures measure the broker, not its client.
"""
