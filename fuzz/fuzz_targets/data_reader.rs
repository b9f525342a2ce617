//! The router's DATA reader: whatever bytes follow a 354, through read
//! buffers of any size, it ends with one outcome; an accepted message
//! never holds a bare CR or LF and never exceeds the size limit.
//! The body is `mailgend::fuzzing::data_reader`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| mailgend::fuzzing::data_reader(input));
