//! The router's SMTP command parser: any line (up to the session's
//! 4096-octet limit) gives a command or an error whose reply is one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgend::route::server::parse_command;

fuzz_target!(|line: &[u8]| {
    if line.len() > 4096 {
        return;
    }
    if let Err(e) = parse_command(line) {
        let reply = e.reply();
        assert!(
            !reply.contains(['\r', '\n']),
            "a reply that ends a line: {reply:?}"
        );
        assert!(reply.len() >= 4 && reply.as_bytes()[..3].iter().all(u8::is_ascii_digit));
    }
});
