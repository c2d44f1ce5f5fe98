// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real `svmgpu-device` binary: options, several sockets, signals.

#[allow(dead_code)]
mod harness;

use std::io::Read;
use std::process::{Command, Stdio};

use harness::{DaemonProcess, TestFrontend};
use svmgpu_spec::{Config, GetInfoResp, Opcode};

#[test]
fn serves_several_sockets_and_exits_on_sigterm() {
    let mut d = DaemonProcess::spawn(&["--socket-count", "2", "--engines", "3"]);
    d.wait_for_sockets(2);
    for index in [1u32, 0] {
        let mut fe = TestFrontend::connect(&d.socket(index), 8 << 20);
        let c = Config::decode(&fe.get_config(0, 64)).unwrap();
        assert_eq!((c.device_index, c.num_engines, c.num_asids), (index, 3, 64));
        fe.start(256);
        let (h, body, _) = fe.control(Opcode::GetInfo.as_u32(), &[], 40);
        assert_eq!(h.status, 0);
        assert_eq!(GetInfoResp::decode(&body).unwrap().device_index, index);
    }
    d.signal("TERM");
    let st = d.wait_exit();
    assert!(st.success(), "exit status {st}");
    assert!(
        !d.socket(0).exists() && !d.socket(1).exists(),
        "sockets removed"
    );
    // Nothing noisy by default.
    let mut out = String::new();
    d.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    d.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(out, "");
    assert_eq!(err, "");
}

#[test]
fn sigint_while_connected() {
    let mut d = DaemonProcess::spawn(&[]);
    d.wait_for_sockets(1);
    let mut fe = TestFrontend::connect(&d.socket(0), 8 << 20);
    fe.start(64);
    d.signal("INT");
    assert!(d.wait_exit().success());
}

#[test]
fn invalid_options_are_rejected_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
        .args([
            "--socket-path",
            "/nonexistent/x",
            "--tlb-entries",
            "10",
            "--tlb-ways",
            "4",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tlb-entries (10) must be a multiple of --tlb-ways (4)"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
        .args(["--socket-path", "/nonexistent/x", "--socket-count", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket-count"));

    // A socket that cannot be bound is a clean failure, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
        .args(["--socket-path", "/nonexistent/dir/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on /nonexistent/dir/x0"),
        "{err}"
    );
}

#[test]
fn print_config_lists_the_config_values() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
        .args(["--print-config", "--engines", "3", "--tlb-entries", "128"])
        .output()
        .expect("run svmgpu-device");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("engines=3\n"), "{text}");
    assert!(text.contains("tlb_entries=128\n"), "{text}");
    assert!(text.contains("magic=0x474d5653\n"), "{text}");
    assert!(text.contains("page_size_mask=0x201000\n"), "{text}");
}

#[test]
fn stats_json_is_written_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let json_arg = json.to_str().unwrap().to_owned();
    let mut d = DaemonProcess::spawn(&["--socket-count", "2", "--stats-json", &json_arg]);
    d.wait_for_sockets(2);
    {
        let mut fe = TestFrontend::connect(&d.socket(1), 8 << 20);
        fe.start(64);
        for _ in 0..3 {
            let (h, _, _) = fe.control(Opcode::GetInfo.as_u32(), &[], 40);
            assert_eq!(h.status, 0);
        }
        let (h, _, _) = fe.control(0x4242, &[], 40);
        assert_eq!(h.status, svmgpu_spec::Status::Unsupported.as_u32());
    }
    d.signal("TERM");
    assert!(d.wait_exit().success());
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(text.starts_with("[{\"device_index\":0,"), "{text}");
    assert!(
        text.contains("{\"device_index\":1,\"commands_completed\":4,\"commands_failed\":1,"),
        "{text}"
    );
    for key in [
        "stale_accesses",
        "tlb_misses",
        "preemptions",
        "page_faults",
        "audit_mismatches",
        "engines",
    ] {
        // Per device; tlb_misses also per engine (two engines each).
        let want = if key == "tlb_misses" { 6 } else { 2 };
        assert_eq!(
            text.matches(&format!("\"{key}\":")).count(),
            want,
            "{key}: {text}"
        );
    }
}
