// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The runtime control socket (`--control-socket PATH`, driven by `svmgpu-ctl`): a Unix
//! stream socket, owner-only (mode 0600), speaking a line-oriented JSON protocol — one
//! request per line, one response per line (device/README.md, "Control socket").
//!
//! Requests are JSON objects `{"cmd":"inject","spec":"...","device":N}` (`cmd` one of
//! `inject`, `clear`, `list`, `stats`, `seed`; `spec` only for `inject`; `device`
//! optional), or the same as words (`inject SPEC [device=N]`, handy with `socat`).
//! Responses are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Malformed input gets an
//! error response and the connection keeps being served; lines are bounded
//! ([`MAX_LINE`]), and so are the clients served at once ([`MAX_CLIENTS`]).

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::gpu::Gpu;
use crate::inject::{InjectError, InjectSpec};

/// Longest request line, in bytes (without the newline).
pub const MAX_LINE: usize = 8192;
/// Clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 8;
/// A client silent for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The control socket: listening, with a thread accepting clients.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` with mode 0600 (a stale socket there is replaced; any other file is an
    /// error) and serves `gpus` on a background thread.
    pub fn bind(path: &Path, gpus: Vec<Arc<Gpu>>) -> io::Result<Self> {
        let listener = bind_private(path)?;
        info!("control socket on {}", path.display());
        let clients = Arc::new(AtomicUsize::new(0));
        let gpus: Arc<[Arc<Gpu>]> = gpus.into();
        thread::Builder::new()
            .name("svmgpu-ctl".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => accept(s, &gpus, &clients),
                        Err(e) => {
                            warn!("control socket: accept failed: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file (on exit).
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Binds a listener at `path` that only the owner can connect to: it is bound inside a new
/// mode-0700 directory next to `path`, made mode 0600, then renamed into place — so there
/// is no moment when someone else could reach it.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp_dir = parent.join(tmp_name);
    fs::DirBuilder::new().mode(0o700).create(&tmp_dir)?;
    let tmp_sock = tmp_dir.join("s");
    let result = UnixListener::bind(&tmp_sock).and_then(|l| {
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp_sock, path)?;
        Ok(l)
    });
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    result
}

fn accept(s: UnixStream, gpus: &Arc<[Arc<Gpu>]>, clients: &Arc<AtomicUsize>) {
    if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        clients.fetch_sub(1, Ordering::AcqRel);
        let mut s = s;
        let _ = writeln!(
            s,
            "{}",
            error(&format!("too many clients (at most {MAX_CLIENTS})"))
        );
        return;
    }
    let gpus = gpus.clone();
    let guard = ClientSlot(clients.clone());
    let spawned = thread::Builder::new()
        .name("svmgpu-ctl-client".into())
        .spawn(move || {
            let _guard = guard;
            if let Err(e) = serve_client(s, &gpus) {
                debug!("control socket client: {e}");
            }
        });
    if let Err(e) = spawned {
        warn!("control socket: cannot spawn a client thread: {e}");
    }
}

/// Frees a client slot when the client's thread ends (or was never started).
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one client until it disconnects (or stays silent for [`IDLE_TIMEOUT`]).
pub fn serve_client(stream: UnixStream, gpus: &[Arc<Gpu>]) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut buf = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let complete = buf.last() == Some(&b'\n');
        if complete {
            buf.pop();
        }
        if buf.len() > MAX_LINE {
            writeln!(
                out,
                "{}",
                error(&format!("request longer than {MAX_LINE} bytes"))
            )?;
            // Skip the rest of the line, a bounded chunk at a time.
            let mut done = complete;
            while !done {
                let mut skip = Vec::new();
                let n = (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut skip)?;
                done = n == 0 || skip.last() == Some(&b'\n');
            }
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        if line.trim().is_empty() {
            if !complete {
                return Ok(());
            }
            continue;
        }
        writeln!(out, "{}", handle_line(gpus, &line))?;
        out.flush()?;
        if !complete {
            return Ok(());
        }
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cmd: String,
    #[serde(default)]
    spec: Option<String>,
    #[serde(default)]
    device: Option<u64>,
}

fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.starts_with('{') {
        return serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"));
    }
    // The word form: CMD [SPEC...] [device=N].
    let mut words: Vec<&str> = line.split_whitespace().collect();
    let mut device = None;
    if let Some(d) = words.last().and_then(|w| w.strip_prefix("device=")) {
        if words.len() > 1 {
            device = Some(d.parse().map_err(|_| format!("bad device '{d}'"))?);
            words.pop();
        }
    }
    let cmd = words.first().copied().unwrap_or_default().to_string();
    let rest = words.get(1..).unwrap_or_default().join(" ");
    Ok(Request {
        cmd,
        spec: (!rest.is_empty()).then_some(rest),
        device,
    })
}

/// An error response line.
fn error(msg: &str) -> String {
    json!({ "ok": false, "error": msg }).to_string()
}

/// Answers one request line (JSON or words) with one JSON line: `{"ok":true,"devices":[...]}`
/// or `{"ok":false,"error":"..."}`.
pub fn handle_line(gpus: &[Arc<Gpu>], line: &str) -> String {
    match execute(gpus, line) {
        Ok(devices) => json!({ "ok": true, "devices": devices }).to_string(),
        Err(e) => {
            debug!("control socket: {e}");
            error(&e)
        }
    }
}

/// One device's answer to `list`.
#[derive(Serialize)]
struct RuleListing {
    id: u64,
    spec: String,
    matches: u64,
    fired: u64,
    exhausted: bool,
}

fn execute(gpus: &[Arc<Gpu>], line: &str) -> Result<Vec<Value>, String> {
    let r = parse_request(line)?;
    let selected: Vec<&Arc<Gpu>> = match r.device {
        Some(d) => vec![gpus
            .get(usize::try_from(d).unwrap_or(usize::MAX))
            .ok_or_else(|| format!("no device {d} (devices: 0..{})", gpus.len()))?],
        None => gpus.iter().collect(),
    };
    if r.spec.is_some() && r.cmd != "inject" {
        return Err(format!("'{}' takes no spec", r.cmd));
    }
    match r.cmd.as_str() {
        "inject" => {
            let text = r.spec.ok_or("inject needs a spec")?;
            let spec = InjectSpec::parse(&text).map_err(|e| e.to_string())?;
            // u32 device indices: `gpus` has at most 64 entries.
            spec.check_devices(u32::try_from(gpus.len()).unwrap_or(u32::MAX))
                .map_err(|e| e.to_string())?;
            if let Some(d) = r.device {
                if let Some(x) = spec
                    .rules
                    .iter()
                    .find(|x| x.device.is_some_and(|m| u64::from(m) != d))
                {
                    return Err(format!("rule '{x}' names another device than device={d}"));
                }
            }
            for g in &selected {
                let inj = g.injector();
                inj.check_room(inj.applicable(&spec))
                    .map_err(|e: InjectError| e.to_string())?;
            }
            selected
                .iter()
                .map(|g| {
                    let ids = g.injector().add(&spec).map_err(|e| e.to_string())?;
                    Ok(json!({ "device": g.index(), "seed": g.injector().seed(), "rules": ids }))
                })
                .collect()
        }
        "clear" => Ok(selected
            .iter()
            .map(|g| json!({ "device": g.index(), "cleared": g.injector().clear() }))
            .collect()),
        "list" => Ok(selected
            .iter()
            .map(|g| {
                let inj = g.injector();
                let rules: Vec<RuleListing> = inj
                    .rules()
                    .iter()
                    .map(|r| RuleListing {
                        id: r.id,
                        spec: r.spec.to_string(),
                        matches: r.matches,
                        fired: r.fired,
                        exhausted: r.exhausted,
                    })
                    .collect();
                json!({
                    "device": g.index(),
                    "seed": inj.seed(),
                    "injections": inj.injections(),
                    "rules": rules,
                })
            })
            .collect()),
        "stats" => Ok(selected.iter().map(|g| g.stats_value()).collect()),
        "seed" => Ok(selected
            .iter()
            .map(|g| json!({ "device": g.index(), "seed": g.injector().seed() }))
            .collect()),
        "" => Err("empty request".into()),
        other => Err(format!(
            "unknown command '{other}' (commands: inject, clear, list, stats, seed)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceOptions;

    fn gpus(n: u32) -> Vec<Arc<Gpu>> {
        (0..n)
            .map(|i| Arc::new(Gpu::new(i, &DeviceOptions::default()).unwrap()))
            .collect()
    }

    fn ok(gpus: &[Arc<Gpu>], line: &str) -> Value {
        let r = handle_line(gpus, line);
        let v: Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(v.get("ok"), Some(&Value::Bool(true)), "{line} -> {r}");
        v
    }

    fn err(gpus: &[Arc<Gpu>], line: &str) -> String {
        let r = handle_line(gpus, line);
        let v: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v.get("ok"), Some(&Value::Bool(false)), "{line} -> {r}");
        v.get("error").and_then(Value::as_str).unwrap().to_string()
    }

    #[test]
    fn requests_parse_in_both_forms() {
        assert_eq!(
            parse_request(r#"{"cmd":"inject","spec":"a b","device":1}"#).unwrap(),
            Request {
                cmd: "inject".into(),
                spec: Some("a b".into()),
                device: Some(1)
            }
        );
        assert_eq!(
            parse_request("  inject seed=1; engine-hang:count=2  device=0 ").unwrap(),
            Request {
                cmd: "inject".into(),
                spec: Some("seed=1; engine-hang:count=2".into()),
                device: Some(0)
            }
        );
        assert_eq!(parse_request("list").unwrap().cmd, "list");
        assert!(parse_request("stats device=x").is_err());
    }

    #[test]
    fn protocol() {
        let g = gpus(2);
        let v = ok(
            &g,
            r#"{"cmd":"inject","spec":"seed=5;tlb-inval-drop:count=1;engine-hang:device=1"}"#,
        );
        let d = v.get("devices").and_then(Value::as_array).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].get("rules").unwrap(), &json!([1]));
        assert_eq!(d[1].get("rules").unwrap(), &json!([1, 2]));
        assert_eq!(d[1].get("seed").and_then(Value::as_u64), Some(5));
        ok(&g, "inject device-reset:p=0.5 device=0");
        let v = ok(&g, r#"{"cmd":"list","device":0}"#);
        let rules = v.get("devices").unwrap().as_array().unwrap()[0]
            .get("rules")
            .unwrap()
            .as_array()
            .unwrap()
            .to_vec();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[1].get("spec").and_then(Value::as_str),
            Some("device-reset:p=0.5")
        );
        assert_eq!(rules[0].get("exhausted"), Some(&Value::Bool(false)));
        let v = ok(&g, "stats");
        let s = &v.get("devices").unwrap().as_array().unwrap()[1];
        assert_eq!(s.get("device_index").and_then(Value::as_u64), Some(1));
        assert_eq!(
            s.get("injected")
                .and_then(|i| i.get("engine-hang"))
                .and_then(Value::as_u64),
            Some(0)
        );
        let v = ok(&g, r#"{"cmd":"seed"}"#);
        let seeds: Vec<u64> = v
            .get("devices")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|d| d.get("seed").and_then(Value::as_u64).unwrap())
            .collect();
        assert_eq!(seeds, [5, 5]);
        let v = ok(&g, "clear device=1");
        assert_eq!(
            v.get("devices").unwrap().as_array().unwrap()[0]
                .get("cleared")
                .and_then(Value::as_u64),
            Some(2)
        );
        assert_eq!(g[1].injector().rules().len(), 0);
        assert_eq!(g[0].injector().rules().len(), 2);
    }

    #[test]
    fn errors_keep_the_protocol_going() {
        let g = gpus(1);
        assert!(err(&g, "{").starts_with("malformed request"));
        assert!(err(&g, "[1]").contains("unknown command"));
        assert!(err(&g, "{}").contains("missing field `cmd`"));
        assert!(err(&g, r#"{"cmd":1}"#).contains("invalid type: integer `1`, expected a string"));
        assert!(err(&g, r#"{"spec":"x"}"#).contains("missing field `cmd`"));
        assert!(err(&g, r#"{"cmd":"list","bogus":1}"#).contains("unknown field `bogus`"));
        assert!(err(&g, "frobnicate").contains("unknown command 'frobnicate'"));
        assert!(err(&g, "inject").contains("inject needs a spec"));
        assert!(err(&g, "inject engine-hung").contains("unknown injection kind"));
        assert!(err(&g, "list device=3").contains("no device 3"));
        assert!(err(&g, "inject engine-hang:device=4").contains("only 1 device(s)"));
        assert!(err(&g, "list extra").contains("takes no spec"));
        let many = vec!["engine-hang"; 40].join(";");
        ok(&g, &format!("inject {many}"));
        assert!(err(&g, &format!("inject {many}")).contains("at most 64"));
        assert_eq!(g[0].injector().rules().len(), 40, "nothing added on error");
        assert!(err(&g, "\u{0}\u{1}garbage").contains("unknown command"));
    }

    #[test]
    fn socket_is_private_and_serves_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // A stale socket is replaced; another kind of file is not.
        drop(UnixListener::bind(&path).unwrap());
        let g = gpus(1);
        let server = ControlServer::bind(&path, g.clone()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut s = UnixStream::connect(&path).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        let mut ask = |s: &mut UnixStream, req: &str| {
            s.write_all(req.as_bytes()).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            line.clone()
        };
        assert!(ask(&mut s, "garbage\n").contains("\"ok\":false"));
        let long = "x".repeat(MAX_LINE * 3) + "\n";
        assert!(ask(&mut s, &long).contains("longer than 8192"));
        assert!(ask(&mut s, "\n\ninject engine-hang\n").contains("\"ok\":true"));
        assert!(ask(&mut s, "{\"cmd\":\"list\"}\n").contains("engine-hang"));
        drop(s);
        server.remove();
        assert!(!path.exists());
        fs::write(&path, b"not a socket").unwrap();
        let e = ControlServer::bind(&path, g).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        // Nothing left behind but that file.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
