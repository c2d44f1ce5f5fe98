// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! cargo-fuzz target: `svmgpu_device::fuzz::sequence`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| svmgpu_device::fuzz::sequence(data));
