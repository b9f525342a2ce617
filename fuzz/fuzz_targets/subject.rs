//! The router's Subject decoder (headers, RFC 2047 encoded-words) and the
//! GoCD subject parser after it: any header block, no panic; a parsed
//! stage run names a non-empty pipeline and stage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgend::route::managers::gocd::subject;
use mailgend::route::router::decode_subject;

fuzz_target!(|data: &[u8]| {
    let s = decode_subject(data);
    if let Some(run) = subject::parse(&s) {
        assert!(!run.pipeline.is_empty() && !run.stage.is_empty());
        let _ = run.key();
    }
});
