"""Settings for the whole test run."""

from __future__ import annotations

import signal

# A shell without job control (a script's `make test &`) starts background commands with SIGINT ignored, and
# child processes inherit that: the `bench run` processes whose Ctrl-C handling tests check would then never see
# it. A Python handler, unlike SIG_IGN, is reset to the default at exec, so the children get Ctrl-C again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
