//! The notifier's recipient-address parser (directives' `recipient_address`
//! comes from event data): an address or an error, no panic.
//! The body is `mailgend::fuzzing::recipient`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| mailgend::fuzzing::recipient(text));
