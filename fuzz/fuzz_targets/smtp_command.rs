//! The router's SMTP command parser: any line (up to the session's
//! 4096-octet limit) gives a command or an error whose reply is one line.
//! The body is `mailgend::fuzzing::smtp_command`, which the normal build compiles
//! and tests on seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| mailgend::fuzzing::smtp_command(line));
