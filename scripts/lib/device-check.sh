#!/usr/bin/env bash
# device-check.sh RUN_DIR GPUS: the device side of one guest run (the folder run-vm.sh --out
# kept). Fails (exit 1) when
#   - device-stats.json (written by svmgpu-device when it exits) is missing, is not a JSON
#     array of GPUS device objects, or a device's audit counted a violation (spec 6.10.4:
#     stale_accesses, unflushed_entries or narrow_flush_entries nonzero, or a counter the
#     device adds later whose name contains "stale");
#   - device.log shows a panic of the device process (a Rust panic message or backtrace).
set -euo pipefail
usage() { echo "Usage: device-check.sh RUN_DIR GPUS"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -eq 2 ]] || { usage >&2; exit 2; }
dir=$1 gpus=$2 bad=0
stats="$dir/device-stats.json"
if [[ ! -f $stats ]]; then
    echo "device-check: $stats missing (the device did not exit cleanly, or did not run)" >&2
    bad=1
else
    python3 - "$stats" "$gpus" <<'PY' || bad=1
import json, sys
path, gpus = sys.argv[1], int(sys.argv[2])
try:
    devs = json.load(open(path))
except Exception as e:
    sys.exit(f"device-check: {path}: not JSON: {e}")
if not isinstance(devs, list) or len(devs) != gpus:
    sys.exit(f"device-check: {path}: want a list of {gpus} devices, got {type(devs).__name__} of {len(devs) if isinstance(devs, list) else '?'}")
VIOLATIONS = ("stale_accesses", "unflushed_entries", "narrow_flush_entries")
missing = [f"device {d.get('device_index')}: no {k}" for d in devs for k in VIOLATIONS if k not in d]
if missing:
    sys.exit("device-check: the statistics lack audit counters: " + "; ".join(missing))
bad = [f"device {d.get('device_index')}: {k}={v}" for d in devs for k, v in d.items()
       if (k in VIOLATIONS or "stale" in k) and isinstance(v, int) and v != 0]
if bad:
    sys.exit("device-check: the device's audit counted violations: " + "; ".join(bad))
PY
fi
if [[ ! -f $dir/device.log ]]; then
    echo "device-check: $dir/device.log missing" >&2
    bad=1
elif hits=$(grep -n -E "panicked at|^stack backtrace:|RUST_BACKTRACE=" "$dir/device.log"); then
    echo "device-check: the device panicked ($dir/device.log):" >&2
    head -n 3 <<<"$hits" >&2
    bad=1
fi
[[ $bad -eq 0 ]] && echo "device-check: $gpus device(s), no audit violation, no panic" >&2
exit "$bad"
