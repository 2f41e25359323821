"""Run a command and write its own peak resident memory and wall time to a JSON file:
`python peak_rss.py RESULT.json COMMAND [ARG ...]`; `dmil_hf.scale.run_measured` starts it.

Why a process of its own: Linux carries the peak memory of the process that starts a command into the command's
`ru_maxrss` (a child created by fork or vfork and then exec'd keeps the maximum of the memory it was created with), so
a command started straight from a large process (a benchmark holding datasets) reports that process's peak when it is
larger than its own. This small script, run by path so that it imports nothing of `dmil_hf`, forks the command from
its own small memory and reads the command's peak with `os.wait4`.
"""

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: peak_rss.py RESULT.json COMMAND [ARG ...]", file=sys.stderr)
        return 2
    result, command = argv[0], argv[1:]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)  # the command could not be started
    _, status, usage = os.wait4(pid, 0)
    with open(result, "w") as handle:
        json.dump({"status": os.waitstatus_to_exitcode(status), "peak_rss_mb": usage.ru_maxrss / 1024.0,  # KiB
                   "wall_seconds": time.perf_counter() - start}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
