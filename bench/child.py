"""``python -m bench.child SPEC OUT``: run one contender in this fresh process.

SPEC is a file holding JSON ``{"target": "module:function", "kwargs": {...}}``. The file
OUT receives ``{"result": <the function's JSON-able return value>,
"peak_rss": <bytes>}``.

The peak is this process's own high-water mark (``VmHWM``), not
``ru_maxrss``: on Linux the kernel folds the *parent's* peak into a child's
``ru_maxrss`` at ``exec``, so a child of a large bench process would report
at least the parent's size.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    module, _, name = spec["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(**spec["kwargs"])
    Path(sys.argv[2]).write_text(json.dumps({"result": result, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    main()
