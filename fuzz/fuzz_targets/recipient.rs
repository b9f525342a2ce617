//! The notifier's recipient-address parser (directives' `recipient_address`
//! comes from event data): an address or an error, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgend::notify::mail::parse_recipient;

fuzz_target!(|text: &str| {
    let _ = parse_recipient(text);
});
