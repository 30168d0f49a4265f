"""Load generator and runner for relayd and the reference relays (issue 6).

Nothing here is shipped; see bench/RESULTS.md and `make bench`.
"""
