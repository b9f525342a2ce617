//! The router's DATA reader: whatever bytes follow a 354, through read
//! buffers of any size, it ends with one outcome; an accepted message
//! never holds a bare CR or LF and never exceeds the size limit.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailgend::route::server::{read_data, DataRead};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    })
}

fuzz_target!(|input: &[u8]| {
    // First byte: the read buffer's size; second: the size limit.
    let [cap, max, data @ ..] = input else {
        return;
    };
    let cap = usize::from(*cap).max(1);
    let max = usize::from(*max) * 64;
    let mut rd = tokio::io::BufReader::with_capacity(cap, data);
    let read = runtime()
        .block_on(read_data(&mut rd, max, Duration::from_secs(10)))
        .expect("reading a slice cannot fail");
    if let DataRead::Message(m) = read {
        assert!(m.len() <= max, "{} octets kept, limit {max}", m.len());
        for (i, &b) in m.iter().enumerate() {
            match b {
                b'\n' => assert!(i > 0 && m[i - 1] == b'\r', "bare LF kept"),
                b'\r' => assert!(m.get(i + 1) == Some(&b'\n'), "bare CR kept"),
                _ => {}
            }
        }
        // The end marker was there, unstuffed lines are not it.
        assert!(data.windows(5).any(|w| w == b"\r\n.\r\n") || data.starts_with(b".\r\n"));
    }
});
