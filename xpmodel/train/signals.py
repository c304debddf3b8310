"""Signals: SIGINT, SIGTERM or SIGHUP (the terminal closed) finishes the
current step, saves, and raises `Interrupted` (exit 130 / 143 / 129); a
second one leaves at once, saying so."""
import os
import signal
import sys

from ..atomic import abandon_partial_writes

_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class Interrupted(Exception):
    """A signal asked the run to stop; raised once the checkpoint is saved."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = _SIGNAL_EXIT[signum]
        self.step = None
        self.checkpoint = None
        self.run_dir = None

    def __str__(self):
        if self.checkpoint is None:
            return f"stopped by {self.signal_name}"
        return (f"stopped by {self.signal_name} at step {self.step}; checkpoint saved to "
                f"{self.checkpoint}; continue with: xpmodel train --resume {self.run_dir}")


class SignalHandling:
    """The Trainer's signal handlers: a signal sets `_stop_signal`, which the
    loop reads after the step it is in."""

    def _install_signal_handlers(self):
        self._previous_handlers = {}
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:   # a forked child inherited this handler
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            if self._stop_signal is not None:
                # A second signal: leave now. Every file is written atomically, so
                # only the temporary file of a save in progress needs removing.
                abandon_partial_writes()
                _show_cursor()   # the live display hid it
                _say(f"stopped at once by a second {signal.Signals(signum).name}; train --resume "
                     f"continues from the last checkpoint saved")
                os._exit(_SIGNAL_EXIT.get(signum, 130))
            self._stop_signal = signum

        for signum in _SIGNAL_EXIT:
            try:
                self._previous_handlers[signum] = signal.signal(signum, handler)
            except ValueError:
                pass   # not the main thread: leave signals alone

    def _restore_signal_handlers(self):
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)


def _say(text):
    """One line on stderr, from a signal handler about to leave."""
    try:
        os.write(2, f"{text}\n".encode())
    except OSError:
        pass


def _show_cursor():
    try:
        if sys.stdout.isatty():
            os.write(sys.stdout.fileno(), b"\x1b[?25h\n")
    except (OSError, ValueError):
        pass
