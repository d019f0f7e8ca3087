"""Run inside a network namespace: one HTTP request (GET, or POST of a JSON body), the outcome as one JSON line."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request


def main() -> None:
    url, timeout = sys.argv[1], float(sys.argv[2])
    # an optional third argument: a JSON body to POST
    data = sys.argv[3].encode() if len(sys.argv) > 3 else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result: dict[str, object] = {"ok": True, "status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:  # an answer all the same (e.g. /readyz 503): its status and body
        result = {"ok": False, "status": exc.code, "body": exc.read().decode()}
    except urllib.error.URLError as exc:
        reason = exc.reason
        errno = getattr(reason, "errno", None)
        result = {"ok": False, "errno": errno, "error": f"{type(reason).__name__}: {reason}"}
    except OSError as exc:  # timeouts while reading
        result = {"ok": False, "errno": exc.errno, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
