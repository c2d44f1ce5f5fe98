#!/usr/bin/env bash
# Pause and continue a running guest through QEMU's QMP socket, as `stop`/`cont` in the
# monitor do (for the device: the rings stop with GET_VRING_BASE and start again; the
# device must keep its state, spec/svmgpu.md section 6.14.4).
#
# Usage: scripts/lib/qmp-pause.sh [--wait-for TEXT] [--until TEXT] [SOCKET] [ROUNDS] [STOP_MS] [RUN_MS] [FIRST_MS]
#   --wait-for TEXT  wait (up to 10 min) until TEXT is in channel.log (the guest's side
#                    channel, next to the socket) before the first stop
#   --until TEXT     at every stop (the guest is frozen then), TEXT must not be in
#                    channel.log yet: each pause must fall before the guest prints it, or
#                    this exits 1. With both, a guest test brackets its work with the two
#                    texts and every round is known to have paused it mid-test.
#   SOCKET   QMP socket (default $SVMGPU_QMP, which run-vm.sh --qmp-hook sets; '' too)
#   ROUNDS   stop/cont cycles (default 5)
#   STOP_MS  how long each stop lasts (default 500)
#   RUN_MS   how long the guest runs between stops (default 1000)
#   FIRST_MS how long before the first stop (default RUN_MS; a guest boots in ~5 s; with
#            --wait-for, counted from when TEXT appeared)
# Prints one line per stop and per cont, with the time since start; exits non-zero if QMP
# refuses a command or a check fails.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
WAIT_FOR="" UNTIL=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --wait-for) WAIT_FOR=${2:?--wait-for needs a text}; shift 2 ;;
        --until) UNTIL=${2:?--until needs a text}; shift 2 ;;
        *) break ;;
    esac
done
SOCK=${1:-${SVMGPU_QMP:?no QMP socket: give one or set SVMGPU_QMP}}
exec python3 - "$SOCK" "${2:-5}" "${3:-500}" "${4:-1000}" "${5:-${4:-1000}}" "$WAIT_FOR" "$UNTIL" <<'PY'
import json, os, socket, sys, time

path, rounds, stop_ms, run_ms, first_ms = sys.argv[1], *map(int, sys.argv[2:6])
wait_for, until = sys.argv[6], sys.argv[7]
channel = os.path.join(os.path.dirname(path), "channel.log")
t0 = time.monotonic()

def say(msg):
    print(f"qmp-pause: {time.monotonic() - t0:7.3f} s: {msg}", flush=True)

def channel_has(text):
    try:
        with open(channel, "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False

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
if wait_for:
    deadline = time.monotonic() + 600
    while not channel_has(wait_for):
        if time.monotonic() > deadline:
            sys.exit(f"qmp-pause: '{wait_for}' never appeared in {channel}")
        time.sleep(0.05)
    say(f"saw '{wait_for}'")
time.sleep(first_ms / 1000)
for i in range(rounds):
    execute("stop")
    if until:
        # The guest is stopped: its side channel cannot grow until `cont`.
        if channel_has(until):
            sys.exit(f"qmp-pause: round {i + 1}: the guest had already printed '{until}'")
        say(f"round {i + 1}: stopped while the test ran")
    else:
        say(f"round {i + 1}: stopped")
    time.sleep(stop_ms / 1000)
    execute("cont")
    say(f"round {i + 1}: continued")
    time.sleep(run_ms / 1000)
say(f"{rounds} rounds done")
PY
