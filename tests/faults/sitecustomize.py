"""Fault injection for tests (on PYTHONPATH only where a test puts it): once the file named by
SAVEGAME_TEST_FAULT exists, the daemon's handling of a worker event raises, standing in for any bug
in the daemon's loop."""
import os

if os.environ.get("SAVEGAME_TEST_FAULT"):
    from savegame.daemon import hang

    _observe = hang.HangWatch.observe

    def _failing_observe(self, event, now):
        if os.path.exists(os.environ["SAVEGAME_TEST_FAULT"]):
            raise RuntimeError("injected fault in the daemon's event handling")
        return _observe(self, event, now)

    hang.HangWatch.observe = _failing_observe
