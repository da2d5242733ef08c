"""A pickle payload, for tests that untrusted checkpoints are refused."""
import os


class Payload:
    """Runs ``touch MARKER`` when unpickled by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))
