"""relayd: relay device TCP streams to WebSocket clients."""

__version__ = "0.1.0"
