//! The notifier's template parser (intelmq-mailgen's `${name}` syntax) in
//! each of its three uses: parsed or refused with a position, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgend::notify::render::template::{Part, TemplateText};

fuzz_target!(|text: &str| {
    for part in [Part::Subject, Part::Body, Part::Text] {
        let _ = TemplateText::parse(text, part);
    }
});
