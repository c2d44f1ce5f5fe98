//! `svmgpu-ktap`: svmgpu's guest test suite. Runs inside the test VM (static binary in the
//! initramfs), prints KTAP v1 to stdout or to the file given with `--out`, and exits 1
//! when any test failed.

mod expect;
mod gpu;
mod ktap;
mod tests;
mod util;

use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out: Box<dyn Write> = Box::new(std::io::stdout());
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => {
                let path = args.next().unwrap_or_default();
                match std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                {
                    Ok(f) => out = Box::new(f),
                    Err(e) => {
                        eprintln!("svmgpu-ktap: cannot open {path}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            "--only" => only = args.next(),
            "-h" | "--help" => {
                println!("usage: svmgpu-ktap [--out FILE] [--only TEST]\ntests:");
                for t in tests::ALL {
                    println!("  {}", t.0);
                }
                return;
            }
            _ => {
                eprintln!("svmgpu-ktap: unknown argument {a}");
                std::process::exit(2);
            }
        }
    }
    let env = tests::Env::new();
    let selected: Vec<_> = tests::ALL
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.0))
        .collect();
    let mut k = ktap::Ktap::new(out, selected.len());
    if let Ok(uptime) = std::fs::read_to_string("/proc/uptime") {
        k.diag(&format!(
            "guest uptime at first test: {} s",
            uptime.split_whitespace().next().unwrap_or("?")
        ));
    }
    for (name, test) in selected {
        test(&env, name, &mut k);
    }
    std::process::exit(i32::from(k.failed() > 0));
}
