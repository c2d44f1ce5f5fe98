// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `svmgpu-ctl`: drives a running `svmgpu-device` through its control socket
//! (`--control-socket PATH`): fault injection rules, statistics, the seed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Drive a running svmgpu-device through its control socket.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The device's control socket (default: $SVMGPU_CTL_SOCKET).
    #[arg(short, long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,

    /// Only this device (socket index); default: every device.
    #[arg(short, long, value_name = "N", global = true)]
    device: Option<u32>,

    /// Print the device's JSON response as is.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Add injection rules: `ITEM[;ITEM...]`, each `seed=S` or `KIND[:key=value,...]`.
    Inject {
        /// The spec (quote it: it contains `;`).
        spec: String,
    },
    /// Remove every injection rule.
    Clear,
    /// List the injection rules, their matches and fires.
    List,
    /// Show the statistics (with injections per kind).
    Stats,
    /// Show the injection seed.
    Seed,
}

fn request(args: &Args) -> String {
    let (cmd, spec) = match &args.cmd {
        Cmd::Inject { spec } => ("inject", Some(spec.as_str())),
        Cmd::Clear => ("clear", None),
        Cmd::List => ("list", None),
        Cmd::Stats => ("stats", None),
        Cmd::Seed => ("seed", None),
    };
    let mut r = json!({ "cmd": cmd });
    if let Some(s) = spec {
        r["spec"] = json!(s);
    }
    if let Some(d) = args.device {
        r["device"] = json!(d);
    }
    r.to_string()
}

fn num(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "?".into(),
    }
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The human-readable form of a successful response.
fn human(cmd: &Cmd, v: &Value) -> String {
    let mut out = String::new();
    let devices = array(v, "devices");
    for d in devices {
        let dev = num(
            d,
            if matches!(cmd, Cmd::Stats) {
                "device_index"
            } else {
                "device"
            },
        );
        match cmd {
            Cmd::Inject { .. } => {
                let ids: Vec<String> = array(d, "rules")
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|i| format!("#{i}"))
                    .collect();
                if ids.is_empty() {
                    out.push_str(&format!(
                        "device {dev}: no rule added (seed {})\n",
                        num(d, "seed")
                    ));
                } else {
                    out.push_str(&format!(
                        "device {dev}: added rule(s) {} (seed {})\n",
                        ids.join(", "),
                        num(d, "seed")
                    ));
                }
            }
            Cmd::Clear => {
                out.push_str(&format!(
                    "device {dev}: {} rule(s) cleared\n",
                    num(d, "cleared")
                ));
            }
            Cmd::Seed => out.push_str(&format!("device {dev}: seed {}\n", num(d, "seed"))),
            Cmd::List => {
                out.push_str(&format!(
                    "device {dev}: seed {}, {} injection(s)\n",
                    num(d, "seed"),
                    num(d, "injections")
                ));
                let rules = array(d, "rules");
                if rules.is_empty() {
                    out.push_str("  (no rules)\n");
                }
                for r in rules {
                    let spec = r.get("spec").and_then(Value::as_str).unwrap_or("?");
                    let done = if r.get("exhausted").and_then(Value::as_bool) == Some(true) {
                        ", exhausted"
                    } else {
                        ""
                    };
                    out.push_str(&format!(
                        "  #{:<3} {spec:<40} matched {}, fired {}{done}\n",
                        num(r, "id"),
                        num(r, "matches"),
                        num(r, "fired")
                    ));
                }
            }
            Cmd::Stats => {
                out.push_str(&format!("device {dev}:\n"));
                for (k, val) in d.as_object().into_iter().flatten() {
                    if let Value::Number(n) = val {
                        if k != "device_index" {
                            out.push_str(&format!("  {k:<26} {n}\n"));
                        }
                    }
                }
                let injected: Vec<String> = d
                    .get("injected")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
                    .map(|(k, n)| format!("    {k:<24} {}", n.as_u64().unwrap_or(0)))
                    .collect();
                out.push_str("  injected by kind:\n");
                if injected.is_empty() {
                    out.push_str("    (none)\n");
                }
                for line in injected {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn run(args: &Args) -> Result<String, String> {
    let path = match &args.socket {
        Some(p) => p.clone(),
        None => std::env::var_os("SVMGPU_CTL_SOCKET")
            .map(PathBuf::from)
            .ok_or("no control socket: give --socket PATH or set SVMGPU_CTL_SOCKET")?,
    };
    let mut s = UnixStream::connect(&path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let timeout = Some(Duration::from_secs(10));
    s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    s.set_write_timeout(timeout).map_err(|e| e.to_string())?;
    writeln!(s, "{}", request(args)).map_err(|e| format!("cannot send: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("no response: {e}"))?;
    let line = line.trim_end().to_string();
    let v: Value =
        serde_json::from_str(&line).map_err(|e| format!("bad response ({e}): {line}"))?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        let e = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(if args.json { line } else { e.to_string() });
    }
    Ok(if args.json {
        line + "\n"
    } else {
        human(&args.cmd, &v)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if args.json && e.starts_with('{') {
                println!("{e}");
            } else {
                eprintln!("svmgpu-ctl: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
