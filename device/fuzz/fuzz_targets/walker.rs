// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! cargo-fuzz target: `walker` of `device/tests/fuzzing/mod.rs` (shared with the property
//! tests, which replay what this target finds).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::walker(data));
