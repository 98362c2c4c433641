"""SIGTERM and SIGINT turned into a flag that a long loop checks between items, so that it can save
what it has done before it exits."""
import signal


class StopRequested:
    """Within the block, SIGTERM/SIGINT set .signal instead of killing the process; the previous handlers
    come back when the block ends."""

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.signal = signum
