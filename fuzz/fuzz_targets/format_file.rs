//! The notifier's format files (`NN*.toml`, docs/formats.md): any file
//! content is loaded or refused with problems, never a panic.
//! The body is `mailgend::fuzzing::format_file`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| mailgend::fuzzing::format_file(text));
