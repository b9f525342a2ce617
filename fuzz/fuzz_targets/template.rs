//! The notifier's template parser (intelmq-mailgen's `${name}` syntax) in
//! each of its three uses: parsed or refused with a position, no panic.
//! The body is `mailgend::fuzzing::template`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| mailgend::fuzzing::template(text));
