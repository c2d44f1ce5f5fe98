#!/usr/bin/env bash
# Pause and continue a running guest through QEMU's QMP socket, as `stop`/`cont` in the
# monitor do (for the device: the rings stop with GET_VRING_BASE and start again; the
# device must keep its state, spec/svmgpu.md section 6.14.4).
#
# Usage: scripts/lib/qmp-pause.sh [SOCKET] [ROUNDS] [STOP_MS] [RUN_MS] [FIRST_MS]
#   SOCKET   QMP socket (default $SVMGPU_QMP, which run-vm.sh --qmp-hook sets)
#   ROUNDS   stop/cont cycles (default 5)
#   STOP_MS  how long each stop lasts (default 500)
#   RUN_MS   how long the guest runs between stops (default 1000)
#   FIRST_MS how long before the first stop (default RUN_MS; a guest boots in ~5 s)
# Prints one line per stop and per cont; exits non-zero if QMP refuses a command.
set -euo pipefail
SOCK=${1:-${SVMGPU_QMP:?no QMP socket: give one or set SVMGPU_QMP}}
exec python3 - "$SOCK" "${2:-5}" "${3:-500}" "${4:-1000}" "${5:-${4:-1000}}" <<'PY'
import json, socket, sys, time

path, rounds, stop_ms, run_ms, first_ms = sys.argv[1], *map(int, sys.argv[2:6])
for _ in range(100):            # QEMU creates the socket when it starts
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"qmp-pause: cannot connect to {path}")
f = s.makefile("rw")

def reply():
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:   # skip events and the greeting
            return msg

def execute(cmd):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    r = reply()
    if "error" in r:
        sys.exit(f"qmp-pause: {cmd}: {r['error']}")

json.loads(f.readline())            # greeting
execute("qmp_capabilities")
time.sleep(first_ms / 1000)
for i in range(rounds):
    execute("stop")
    print(f"qmp-pause: round {i + 1}: stopped", flush=True)
    time.sleep(stop_ms / 1000)
    execute("cont")
    print(f"qmp-pause: round {i + 1}: continued", flush=True)
    time.sleep(run_ms / 1000)
PY
