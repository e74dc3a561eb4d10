"""Start `leukodiff serve` from an installed wheel and check it answers (make inference-only).

    python .ci/station_smoke.py VENV
"""

import subprocess
import sys
import time
import urllib.error
import urllib.request

venv = sys.argv[1]
server = subprocess.Popen([f"{venv}/bin/leukodiff", "serve", "--data-dir", f"{venv}/station",
                           "--port", "8765"])
try:
    deadline = time.monotonic() + 60
    while True:
        try:
            health = urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("the review station did not start")
            time.sleep(0.5)
    login = urllib.request.urlopen("http://127.0.0.1:8765/login", timeout=5)
    print(f"review station from the wheel: health {health.decode()}, login page {login.status}")
finally:
    server.terminate()
    server.wait(timeout=30)
