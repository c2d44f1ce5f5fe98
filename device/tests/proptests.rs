// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Property tests (proptest) of the command decoder, the page walker, the ISA decoder and
//! executor, the fault-injection grammar and the control-socket protocol, through the same entry points as the cargo-fuzz targets (`tests/fuzzing/mod.rs`),
//! plus a replay of every input the fuzzers found (`tests/fuzz_regressions/<target>/`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

#[allow(dead_code)]
mod fuzzing;

use fuzzing as fuzz;
use proptest::prelude::*;
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::ctl;
use svmgpu_device::gpu::Gpu;
use svmgpu_device::inject::{InjectSpec, Kind};
use svmgpu_spec::isa::{header, insn_qwords};
use svmgpu_spec::pte;
use svmgpu_spec::{CtrlHeader, Opcode};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A request: a valid header for a real opcode (most of the time) and a body of the right
/// length (most of the time), filled with small or arbitrary values.
fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(Opcode::ALL.to_vec()),
        any::<u64>(),
        prop::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..64),
        0u8..4,
    )
        .prop_map(|(op, seqno, mut body, shape)| {
            let mut v = CtrlHeader {
                opcode: op.as_u32(),
                flags: u32::from(shape == 3),
                seqno,
            }
            .to_bytes()
            .to_vec();
            if shape != 2 {
                body.resize(op.request_body_size(), 0);
            }
            v.extend(body);
            v
        })
}

/// A page-table image: a chain of tables starting at `root`, with entries that are mostly
/// plausible (present, aligned, inside the image) and sometimes garbage.
fn pt_image() -> impl Strategy<Value = (u64, u64, Vec<u8>)> {
    let entry = prop_oneof![
        (0u64..16, any::<bool>(), any::<bool>()).prop_map(|(page, w, x)| {
            pte::page_4k(
                page * 4096,
                pte::Perms {
                    writable: w,
                    no_exec: x,
                },
            )
            .unwrap()
        }),
        (0u64..16).prop_map(|page| pte::table(page * 4096).unwrap()),
        Just(pte::page_2m(0, pte::Perms::default()).unwrap()),
        any::<u64>(),
        Just(0u64),
    ];
    (
        any::<u64>(),
        0u64..17,
        prop::collection::vec((0usize..fuzz::IMAGE / 8, entry.clone()), 0..64),
        path(entry),
        0u8..8,
    )
        .prop_map(|(va, root_page, entries, path, wide)| {
            let mut img = vec![0u8; fuzz::IMAGE];
            for (slot, e) in entries {
                img[slot * 8..slot * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            // Usually a 48-bit VA, and its own path written level by level, so that walks
            // get deep.
            let va = if wide == 0 {
                va
            } else {
                va & 0x0000_ffff_ffff_ffff
            };
            let mut t = root_page * 4096;
            for (level, e) in (0..4u32).rev().zip(path) {
                let Some(at) = pte::entry_address(t, va, level) else {
                    break;
                };
                let at = at as usize;
                if at + 8 > img.len() {
                    break;
                }
                img[at..at + 8].copy_from_slice(&e.to_le_bytes());
                t = e & pte::ADDR_MASK;
            }
            (va, root_page * 4096, img)
        })
}

/// The entries on one VA's path, root first: mostly table pointers, then a leaf, sometimes
/// anything.
fn path(any_entry: impl Strategy<Value = u64> + Clone) -> impl Strategy<Value = Vec<u64>> {
    let table = (0u64..16).prop_map(|page| pte::table(page * 4096).unwrap());
    let leaf = (0u64..16, any::<bool>(), any::<bool>()).prop_map(|(page, w, x)| {
        pte::page_4k(
            page * 4096,
            pte::Perms {
                writable: w,
                no_exec: x,
            },
        )
        .unwrap()
    });
    let level = |s: BoxedStrategy<u64>| prop_oneof![4 => s, 1 => any_entry.clone()];
    (
        level(table.clone().boxed()),
        level(table.clone().boxed()),
        level(prop_oneof![table, Just(pte::page_2m(0, pte::Perms::default()).unwrap())].boxed()),
        level(leaf.boxed()),
    )
        .prop_map(|(a, b, c, d)| vec![a, b, c, d])
}

/// An instruction stream: valid opcodes with small operands, occasionally garbage.
fn batch() -> impl Strategy<Value = Vec<u8>> {
    let insn = (
        0u8..13,
        any::<u8>(),
        0u8..7,
        any::<u32>(),
        any::<[u64; 3]>(),
        0u8..8,
    )
        .prop_map(|(op, flags, sub, imm, ops, mode)| {
            let flags = if mode < 6 { flags & 1 } else { flags };
            let imm = if mode < 4 { imm % 64 } else { imm };
            let hdr = header(op, flags, if op == 7 { sub } else { 0 }, imm);
            let n = insn_qwords(hdr).unwrap_or(1);
            let mut w = vec![hdr];
            for (i, o) in ops.iter().enumerate().take(n - 1) {
                // Memory operands inside the 64 KiB space, lengths small.
                w.push(if mode < 6 {
                    if i == 2 || (op == 4 && i == 1) {
                        (o % 4096) & !3
                    } else {
                        (o % 0x1_0000) & !7
                    }
                } else {
                    *o
                });
            }
            w
        });
    prop::collection::vec(insn, 1..24).prop_map(|v| {
        v.into_iter()
            .flatten()
            .flat_map(|q| q.to_le_bytes())
            .collect()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn control_decoder(cap in 0u16..300, req in request()) {
        let mut data = cap.to_le_bytes().to_vec();
        data.extend(req);
        fuzz::control(&data);
    }

    #[test]
    fn control_decoder_raw(data in prop::collection::vec(any::<u8>(), 0..200)) {
        fuzz::control(&data);
    }

    #[test]
    fn walker_agrees_with_the_reference((va, root, img) in pt_image()) {
        let mut data = va.to_le_bytes().to_vec();
        data.extend(root.to_le_bytes());
        data.extend(img);
        fuzz::walker(&data);
    }

    #[test]
    fn isa_decoder_and_executor(b in batch()) {
        fuzz::isa(&b);
    }

    #[test]
    fn isa_raw(b in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz::isa(&b);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..config() })]

    #[test]
    fn command_sequences(ops in prop::collection::vec(any::<[u64; 2]>(), 0..48), batch in batch()) {
        let mut data: Vec<u8> = ops.iter().flat_map(|[a, b]| {
            let mut v = a.to_le_bytes().to_vec();
            v.extend(b.to_le_bytes());
            v
        }).collect();
        data.extend(batch);
        fuzz::sequence(&data);
    }
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                continue;
            }
            let data = std::fs::read(&p).expect("read regression input");
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_regressions_replay() {
    let n = replay("control", fuzz::control)
        + replay("walker", fuzz::walker)
        + replay("isa", fuzz::isa)
        + replay("sequence", fuzz::sequence);
    // Inputs are kept only when a fuzzer found something; none is also fine.
    println!("replayed {n} fuzzer-found inputs");
}

/// Text that looks like an injection spec: kinds, keys, values and separators, mixed.
fn spec_text() -> impl Strategy<Value = String> {
    let kinds: Vec<String> = Kind::ALL.iter().map(|k| k.name().to_string()).collect();
    let token = prop_oneof![
        prop::sample::select(kinds),
        prop::sample::select(
            [
                "p", "count", "every", "after", "device", "asid", "ctx", "engine", "va", "rec",
                "delay_us", "status", "field", "level", "seed", "bogus",
            ]
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
        ),
        prop::sample::select(
            [
                ":",
                ",",
                ";",
                "=",
                "-",
                " ",
                "0",
                "1",
                "0.5",
                "0x1000",
                "1_0",
                "3",
                "9999999999999999999999",
                "job",
                "timeout",
                "kind",
                ".",
                "",
            ]
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
        ),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(token, 0..24).prop_map(|t| t.concat())
}

fn ctl_gpus() -> &'static [Arc<Gpu>] {
    static GPUS: OnceLock<Vec<Arc<Gpu>>> = OnceLock::new();
    GPUS.get_or_init(|| {
        (0..2)
            .map(|i| Arc::new(Gpu::new(i, &DeviceOptions::default()).unwrap()))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..config() })]

    #[test]
    fn inject_grammar_never_panics_and_round_trips(text in spec_text()) {
        if let Ok(spec) = InjectSpec::parse(&text) {
            let canon = spec.to_string();
            prop_assert_eq!(InjectSpec::parse(&canon), Ok(spec), "{} -> {}", text, canon);
        }
    }

    #[test]
    fn control_protocol_always_answers_one_json_line(
        form in 0u8..4,
        text in spec_text(),
        raw in "\\PC{0,80}",
    ) {
        let line = match form {
            0 => format!("inject {text}"),
            1 => format!("{{\"cmd\":\"inject\",\"spec\":{}}}", serde_json::to_string(&text).unwrap()),
            2 => raw,
            _ => format!("{{\"cmd\":{}}}", serde_json::to_string(&text).unwrap()),
        };
        let out = ctl::handle_line(ctl_gpus(), &line);
        prop_assert!(!out.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| TestCaseError::fail(format!("{out}: {e}")))?;
        prop_assert!(v.get("ok").and_then(serde_json::Value::as_bool).is_some(), "{}", out);
        // Keep room for more rules.
        if ctl_gpus()[0].injector().rules().len() > 48 {
            for g in ctl_gpus() {
                g.injector().clear();
            }
        }
    }
}
