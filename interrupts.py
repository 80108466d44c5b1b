"""Imported by each command-line script before anything else of its: Ctrl-C while the imports load
torch (a second or more) ends as it does later, in "interrupted" and exit code 130, not a traceback
of the import machinery. utils.run_cli hands Ctrl-C back to Python once the command runs. A module
that is not a script of this project's (a test importing train.py) changes nothing."""

import os
import signal
import sys
from pathlib import Path


def interrupted_while_loading(signum: int, frame: object) -> None:
    print("interrupted", file=sys.stderr)
    os._exit(130)  # nothing is saved or open yet


def running_a_script_of_ours() -> bool:
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is not None and Path(main).resolve().parent == Path(__file__).resolve().parent


if running_a_script_of_ours() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_loading)
