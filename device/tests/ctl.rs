// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real binaries: `svmgpu-device --inject ... --control-socket PATH` driven by
//! `svmgpu-ctl`, and the validation of `--inject`.

#[allow(dead_code)]
mod harness;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::driver::Driver;
use harness::{DaemonProcess, TestFrontend};
use serde_json::Value;
use svmgpu_spec::*;

fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svmgpu-ctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("SVMGPU_CTL_SOCKET")
        .output()
        .expect("run svmgpu-ctl")
}

fn ok(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        out.status.success(),
        "svmgpu-ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn control_socket_and_svmgpu_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let stats = dir.path().join("stats.json");
    let mut d = DaemonProcess::spawn(&[
        "--socket-count",
        "2",
        "--tlb-inval-latency-ns",
        "0",
        "--inject",
        "seed=99;tlb-inval-drop:count=1,device=0",
        "--control-socket",
        sock.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    d.wait_for_sockets(2);
    wait_for(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only");

    // Configured at start: device 0 (which has a rule) offers FAULT_INJECT, device 1 not.
    let fe1 = TestFrontend::connect(&d.socket(1), 8 << 20);
    assert_eq!(fe1.offered_features & (1 << SVMGPU_F_FAULT_INJECT), 0);
    drop(fe1);
    let fe = TestFrontend::connect_with(&d.socket(0), 8 << 20, 1 << SVMGPU_F_FAULT_INJECT);
    let mut drv = Driver::new(fe, 16);

    assert_eq!(
        ok(&sock, &["seed"]),
        "device 0: seed 99\ndevice 1: seed 99\n"
    );
    let list = ok(&sock, &["list"]);
    assert!(
        list.contains("device 0: seed 99, 0 injection(s)")
            && list.contains("#1   tlb-inval-drop:count=1,device=0")
            && list.contains("device 1: seed 99, 0 injection(s)\n  (no rules)"),
        "{list}"
    );

    // The start rule drops the first invalidation of device 0.
    let dropped = drv.invalidate(1, 0, 4096);
    let s = drv.invalidate(1, 0, 4096);
    assert_eq!(drv.wait_done(s).status, 0);
    assert!(!drv.completions.iter().any(|c| c.seqno == dropped));

    // A rule added at run time, JSON output.
    let out = ok(
        &sock,
        &[
            "--json",
            "--device",
            "0",
            "inject",
            "completion-duplicate:count=1,rec=command",
        ],
    );
    let v = serde_json::from_str::<Value>(out.trim()).unwrap();
    assert_eq!(v.get("ok"), Some(&Value::Bool(true)));
    let devs = v.get("devices").and_then(Value::as_array).unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(
        devs[0].get("rules").unwrap(),
        &serde_json::from_str::<Value>("[2]").unwrap()
    );
    let s = drv.invalidate(1, 0, 4096);
    drv.wait_done(s);
    drv.wait_done(s);

    // Statistics, human and JSON.
    let human = ok(&sock, &["--device", "0", "stats"]);
    assert!(human.starts_with("device 0:\n"), "{human}");
    assert!(
        human.contains("  injected_faults            2\n"),
        "{human}"
    );
    assert!(
        human.contains("    tlb-inval-drop           1\n"),
        "{human}"
    );
    assert!(
        human.contains("    completion-duplicate     1\n"),
        "{human}"
    );
    let v = serde_json::from_str::<Value>(ok(&sock, &["--json", "stats"]).trim()).unwrap();
    let devs = v.get("devices").and_then(Value::as_array).unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(
        devs[0].get("injected_faults").and_then(Value::as_u64),
        Some(2)
    );
    let list = ok(&sock, &["list", "--device", "0"]);
    assert!(list.contains("matched 1, fired 1, exhausted"), "{list}");

    // Errors: exit status 1 and one clear line.
    let out = ctl(&sock, &["inject", "engine-hung"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("svmgpu-ctl: unknown injection kind 'engine-hung'"),
        "{err}"
    );
    let out = ctl(&sock, &["--json", "--device", "7", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":false"));
    let out = ctl(&dir.path().join("nope"), &["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    // Malformed input on a raw connection: an error line, and the connection keeps serving.
    let mut raw = UnixStream::connect(&sock).unwrap();
    let mut rd = BufReader::new(raw.try_clone().unwrap());
    raw.write_all(b"{\"cmd\":\n\xff\xfe garbage\nseed device=1\n")
        .unwrap();
    for expect in ["\"ok\":false", "\"ok\":false", "\"seed\":99"] {
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        assert!(line.contains(expect), "{line}");
    }
    drop(raw);

    assert_eq!(
        ok(&sock, &["clear"]),
        "device 0: 2 rule(s) cleared\ndevice 1: 0 rule(s) cleared\n"
    );
    drop(drv);

    d.signal("TERM");
    assert!(d.wait_exit().success());
    assert!(!sock.exists(), "control socket removed on exit");
    let dump = std::fs::read_to_string(&stats).unwrap();
    assert!(
        dump.contains("\"injected\":{\"tlb-inval-delay\":0,\"tlb-inval-drop\":1,"),
        "{dump}"
    );
}

#[test]
fn inject_is_validated_at_start() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
            .args(["--socket-path", "/nonexistent/x"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for (args, msg) in [
        (
            &["--inject", "tlb-inval-drop:count=x"][..],
            "svmgpu-device: --inject: tlb-inval-drop: bad value 'x' for 'count'",
        ),
        (
            &["--inject", "device-reset:asid=1"][..],
            "svmgpu-device: --inject: device-reset: unknown key 'asid'",
        ),
        (
            &["--inject", "seed=1", "--inject", "engine-hang:device=2"][..],
            "svmgpu-device: --inject: engine-hang: device=2, but there are only 1 device(s)",
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(msg), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // A control socket that cannot be created: status 1.
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("s");
    let out = Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
        .arg("--socket-path")
        .arg(&prefix)
        .args(["--control-socket", "/nonexistent/dir/ctl.sock"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot serve the control socket"));
}

#[test]
fn ctl_needs_a_socket() {
    let out = Command::new(env!("CARGO_BIN_EXE_svmgpu-ctl"))
        .arg("list")
        .env_remove("SVMGPU_CTL_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket PATH or set SVMGPU_CTL_SOCKET"));
}
