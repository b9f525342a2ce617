//! The router's Subject decoder (headers, RFC 2047 encoded-words) and the
//! GoCD subject parser after it: any header block, no panic; a parsed
//! stage run names a non-empty pipeline and stage.
//! The body is `mailgend::fuzzing::subject`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mailgend::fuzzing::subject(data));
