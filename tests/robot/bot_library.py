"""A Robot Framework keyword library served by robotremoteserver (XML-RPC over HTTP).

Usage: python3 bot_library.py NAME PORT_FILE [COLD_START_SECONDS]
Serves on 127.0.0.1 with an ephemeral port, written to PORT_FILE once listening.
With COLD_START_SECONDS, the first invoice takes that much longer, as a bot's
first job does while its keyword library warms up.
"""
import sys
import threading
import time

from robotremoteserver import RobotRemoteServer


class BotLibrary:
    """Keywords of one RPA bot."""

    def __init__(self, name, cold_start=0.0):
        self._name = name
        self._cold_start = cold_start
        self._lock = threading.Lock()
        self._running = 0

    def whoami(self):
        """Returns the bot's name."""
        return self._name

    def process_invoice(self, invoice_id, amount):
        """Pretends to process an invoice; returns a receipt naming the bot."""
        with self._lock:
            self._running += 1
        try:
            with self._lock:
                cold, self._cold_start = self._cold_start, 0.0
            time.sleep(0.01 + cold)
            return {"bot": self._name, "invoice": invoice_id, "total": float(amount) * 1.2}
        finally:
            with self._lock:
                self._running -= 1

    def fail_on_purpose(self, message):
        """Fails like a broken RPA step would."""
        raise AssertionError(message)


if __name__ == "__main__":
    name, port_file = sys.argv[1], sys.argv[2]
    cold_start = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    # robotremoteserver writes the bound port to port_file once it listens.
    RobotRemoteServer(BotLibrary(name, cold_start), host="127.0.0.1", port=0, port_file=port_file)
