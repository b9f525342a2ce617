//! Realistic IntelMQ events carrying notification directives.
//!
//! The demo needs a plausible morning's worth of Shadowserver reports and
//! the benchmark needs many of them with a realistic shape: a few networks
//! account for most events (Zipf-distributed per ASN), most events have one
//! directive and some have two, and the directives aggregate by ASN and
//! observation time the way the CERT-bund rules bot emits them.
//! [`Feed`] generates such events deterministically from a seed;
//! [`insert`] writes them into `events` with `COPY … FROM STDIN`, which,
//! like IntelMQ's own inserts, fires the row triggers that create the
//! directive rows.
//!
//! Everything is made up and unreachable by construction: source addresses
//! come from the documentation prefixes (192.0.2.0/24, 198.51.100.0/24,
//! 203.0.113.0/24, 2001:db8::/32) and the benchmarking prefix
//! 198.18.0.0/15, AS numbers from the documentation ranges (64496–64511,
//! 65536–65551), then private use (64512–65534), then the IANA-reserved
//! 65552–131071 (the `integer` column rules out 32-bit private ASNs), and
//! recipients live under example.net/.org/.com.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use futures::SinkExt;
use rand::distributions::WeightedIndex;
use rand::prelude::*;
use rand::rngs::StdRng;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::SandboxError;

/// One Shadowserver-style feed and the directive fields its events get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedKind {
    /// `feed.name`.
    pub feed_name: &'static str,
    pub notification_format: &'static str,
    pub event_data_format: &'static str,
    /// The template file the directive names.
    pub template_name: &'static str,
    pub classification_taxonomy: &'static str,
    pub classification_type: &'static str,
    /// For the malware feed the malware name is used instead.
    pub classification_identifier: &'static str,
    pub protocol_transport: &'static str,
    pub protocol_application: &'static str,
    /// The scanned service's port; 0: a random client port (drones).
    pub source_port: u16,
    /// Relative share of the events.
    pub weight: u32,
}

/// The five feeds the generator draws from (names as in intelmq-mailgen's
/// CERT-bund examples).
pub const FEEDS: [FeedKind; 5] = [
    FeedKind {
        feed_name: "Open-Redis",
        notification_format: "shadowserver",
        event_data_format: "csv_Open-Redis",
        template_name: "shadowserver_csv_Open-Redis",
        classification_taxonomy: "vulnerable",
        classification_type: "vulnerable-system",
        classification_identifier: "open-redis",
        protocol_transport: "tcp",
        protocol_application: "redis",
        source_port: 6379,
        weight: 25,
    },
    FeedKind {
        feed_name: "DNS-open-resolvers",
        notification_format: "shadowserver",
        event_data_format: "csv_DNS-open-resolvers",
        template_name: "shadowserver_csv_DNS-open-resolvers",
        classification_taxonomy: "vulnerable",
        classification_type: "vulnerable-system",
        classification_identifier: "dns-open-resolver",
        protocol_transport: "udp",
        protocol_application: "dns",
        source_port: 53,
        weight: 30,
    },
    FeedKind {
        feed_name: "Open-SNMP",
        notification_format: "shadowserver",
        event_data_format: "csv_Open-SNMP",
        template_name: "shadowserver_csv_Open-SNMP",
        classification_taxonomy: "vulnerable",
        classification_type: "vulnerable-system",
        classification_identifier: "open-snmp",
        protocol_transport: "udp",
        protocol_application: "snmp",
        source_port: 161,
        weight: 20,
    },
    FeedKind {
        feed_name: "Ssl-Freak-Scan",
        notification_format: "shadowserver",
        event_data_format: "csv_Ssl-Freak-Scan",
        template_name: "shadowserver_csv_Ssl-Freak-Scan",
        classification_taxonomy: "vulnerable",
        classification_type: "vulnerable-system",
        classification_identifier: "ssl-freak",
        protocol_transport: "tcp",
        protocol_application: "https",
        source_port: 443,
        weight: 10,
    },
    FeedKind {
        feed_name: "Drone",
        notification_format: "malware",
        event_data_format: "csv_malware",
        template_name: "shadowserver_csv_malware",
        classification_taxonomy: "malicious-code",
        classification_type: "infected-system",
        classification_identifier: "",
        protocol_transport: "tcp",
        protocol_application: "http",
        source_port: 0,
        weight: 15,
    },
];

/// `recipient_group` values some recipients' directives carry.
pub const RECIPIENT_GROUPS: [&str; 6] = [
    "Government",
    "Energy",
    "Water",
    "Health",
    "Finance",
    "Telecom",
];

const MALWARE: [&str; 6] = [
    "andromeda",
    "mirai",
    "conficker",
    "necurs",
    "emotet",
    "qsnatch",
];

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedParams {
    pub events: usize,
    /// Distinct primary recipients (each gets the ASNs `i` with
    /// `i % recipients == r`).
    pub recipients: usize,
    pub asns: usize,
    /// Share of events with a second directive (to another recipient).
    pub two_directive_share: f64,
    /// Zipf exponent of the events-per-ASN distribution (0: uniform).
    pub zipf_s: f64,
    pub seed: u64,
    /// `time.observation` of every event (one feed run) and the
    /// `time.observation` aggregate key; `time.source` lies up to 6 h
    /// before it.
    pub time_observation: DateTime<Utc>,
    /// Seconds; 0 notifies at once (the demo), -1 never.
    pub notification_interval: i64,
    /// Share of recipients whose directives carry a `recipient_group`.
    pub group_share: f64,
    /// Share of events with an IPv6 source.
    pub ipv6_share: f64,
}

impl Default for FeedParams {
    fn default() -> Self {
        FeedParams {
            events: 1000,
            recipients: 500,
            asns: 2000,
            two_directive_share: 0.10,
            zipf_s: 1.0,
            seed: 1,
            time_observation: Utc
                .with_ymd_and_hms(2024, 5, 1, 6, 0, 0)
                .single()
                .expect("valid date"),
            notification_interval: 0,
            group_share: 0.2,
            ipv6_share: 0.05,
        }
    }
}

/// One event to insert: the typed column values the generator fills and
/// `extra` (which holds `certbund.source_directives`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub time_source: DateTime<Utc>,
    pub time_observation: DateTime<Utc>,
    pub feed_name: String,
    pub feed_provider: String,
    pub feed_accuracy: f32,
    pub classification_taxonomy: String,
    pub classification_type: String,
    pub classification_identifier: String,
    pub protocol_transport: String,
    pub protocol_application: String,
    pub source_ip: IpAddr,
    pub source_port: i32,
    pub source_asn: i32,
    /// CIDR text, e.g. `198.18.0.0/26`.
    pub source_network: String,
    pub source_geolocation_cc: String,
    pub source_reverse_dns: Option<String>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: Option<i32>,
    pub destination_fqdn: Option<String>,
    pub malware_name: Option<String>,
    /// Base64 of the (made-up) report line, as IntelMQ stores `raw`.
    pub raw: String,
    pub extra: Value,
}

impl NewEvent {
    /// `extra.certbund.source_directives` (empty if absent).
    pub fn directives(&self) -> &[Value] {
        self.extra
            .pointer("/certbund/source_directives")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// The columns [`insert`] fills, in order. A table that has at least these
/// columns (with compatible types) will do, e.g. a trigger-free test table.
pub const INSERT_COLUMNS: [&str; 22] = [
    "time.source",
    "time.observation",
    "feed.name",
    "feed.provider",
    "feed.accuracy",
    "classification.taxonomy",
    "classification.type",
    "classification.identifier",
    "protocol.transport",
    "protocol.application",
    "source.ip",
    "source.port",
    "source.asn",
    "source.network",
    "source.geolocation.cc",
    "source.reverse_dns",
    "destination.ip",
    "destination.port",
    "destination.fqdn",
    "malware.name",
    "raw",
    "extra",
];

struct Network {
    asn: i32,
    /// First address and size of the v4 block.
    v4_base: u32,
    v4_size: u32,
    v4_prefix: u8,
    /// `2001:db8:<v6_index>::/48`.
    v6_index: u16,
}

struct Recipient {
    address: String,
    group: Option<&'static str>,
}

/// A seeded generator of events; [`Feed::events`] yields the same
/// sequence every time for the same parameters.
pub struct Feed {
    params: FeedParams,
    networks: Vec<Network>,
    recipients: Vec<Recipient>,
    asn_weights: WeightedIndex<f64>,
    feed_weights: WeightedIndex<u32>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// The ASN with index `i`: documentation, then private use, then reserved.
fn asn_number(i: usize) -> i32 {
    const DOC16: std::ops::RangeInclusive<i32> = 64496..=64511;
    const DOC32: std::ops::RangeInclusive<i32> = 65536..=65551;
    const PRIVATE16: std::ops::RangeInclusive<i32> = 64512..=65534;
    let i = i as i32;
    let mut base = 0;
    for range in [DOC16, DOC32, PRIVATE16] {
        let len = range.end() - range.start() + 1;
        if i < base + len {
            return range.start() + (i - base);
        }
        base += len;
    }
    65552 + (i - base)
}

impl Feed {
    pub fn new(params: FeedParams) -> Result<Feed, SandboxError> {
        let invalid = |m: &str| Err(SandboxError::Invalid(format!("feed parameters: {m}")));
        if params.asns == 0 || params.recipients == 0 {
            return invalid("asns and recipients must be at least 1");
        }
        // Each ASN needs at least a /30 inside 198.18.0.0/15.
        if params.asns > 32_000 {
            return invalid("at most 32000 ASNs");
        }
        if params.recipients < 2 && params.two_directive_share > 0.0 {
            return invalid("a second directive needs at least 2 recipients");
        }
        for (name, share) in [
            ("two_directive_share", params.two_directive_share),
            ("group_share", params.group_share),
            ("ipv6_share", params.ipv6_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return invalid(&format!("{name} must be within 0..=1"));
            }
        }
        if !(params.zipf_s >= 0.0 && params.zipf_s.is_finite()) {
            return invalid("zipf_s must be finite and >= 0");
        }
        let mut rng = StdRng::seed_from_u64(params.seed);

        // The three documentation /24s go to the first three ASNs; the
        // others share 198.18.0.0/15 (minus its last /24, kept for the
        // drones' sinkhole), in equal power-of-two blocks.
        let bench_space: u32 = (1 << 17) - 256;
        let others = params.asns.saturating_sub(3).max(1) as u32;
        let block = (bench_space / others).max(4);
        let block = 1u32 << (31 - block.leading_zeros()); // round down to 2^k
        let networks = (0..params.asns)
            .map(|i| {
                let (v4_base, v4_size) = match i {
                    0 => (u32::from(Ipv4Addr::new(192, 0, 2, 0)), 256),
                    1 => (u32::from(Ipv4Addr::new(198, 51, 100, 0)), 256),
                    2 => (u32::from(Ipv4Addr::new(203, 0, 113, 0)), 256),
                    _ => (
                        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i as u32 - 3) * block,
                        block,
                    ),
                };
                Network {
                    asn: asn_number(i),
                    v4_base,
                    v4_size,
                    v4_prefix: 32 - v4_size.trailing_zeros() as u8,
                    v6_index: i as u16,
                }
            })
            .collect();

        let recipients = (0..params.recipients)
            .map(|r| {
                let tld = ["net", "org", "com"][r % 3];
                // Named after its first ASN (index r, if it has any).
                let address = if r < params.asns {
                    format!("abuse@as{}.example.{tld}", asn_number(r))
                } else {
                    format!("abuse@isp{r}.example.{tld}")
                };
                let group = rng
                    .gen_bool(params.group_share)
                    .then(|| *RECIPIENT_GROUPS.choose(&mut rng).expect("non-empty"));
                Recipient { address, group }
            })
            .collect();

        // Zipf over ASN ranks; which ASN holds which rank is shuffled so
        // the documentation ASNs are not always the busiest.
        let mut rank: Vec<usize> = (0..params.asns).collect();
        rank.shuffle(&mut rng);
        let mut weights = vec![0.0; params.asns];
        for (r, &asn_index) in rank.iter().enumerate() {
            weights[asn_index] = 1.0 / ((r + 1) as f64).powf(params.zipf_s);
        }
        let asn_weights = WeightedIndex::new(&weights)
            .map_err(|e| SandboxError::Invalid(format!("ASN weights: {e}")))?;
        let feed_weights = WeightedIndex::new(FEEDS.iter().map(|f| f.weight))
            .map_err(|e| SandboxError::Invalid(format!("feed weights: {e}")))?;
        Ok(Feed {
            params,
            networks,
            recipients,
            asn_weights,
            feed_weights,
        })
    }

    pub fn params(&self) -> &FeedParams {
        &self.params
    }

    /// The recipient that gets the directives for ASN index `i`.
    fn recipient_of(&self, asn_index: usize) -> usize {
        asn_index % self.recipients.len()
    }

    /// The events, in the same order every time.
    pub fn events(&self) -> impl Iterator<Item = NewEvent> + '_ {
        // A stream of its own, so the setup draws above do not shift it.
        let mut rng = StdRng::seed_from_u64(self.params.seed ^ 0x6576_656e_7473_2121);
        (0..self.params.events).map(move |_| self.event(&mut rng))
    }

    fn directive(&self, kind: &FeedKind, recipient: usize, asn: i32) -> Value {
        let recipient = &self.recipients[recipient];
        let mut aggregate = json!({
            "source.asn": asn,
            "time.observation": self
                .params
                .time_observation
                .to_rfc3339_opts(SecondsFormat::Secs, false),
        });
        if let Some(group) = recipient.group {
            aggregate["recipient_group"] = json!(group);
        }
        json!({
            "medium": "email",
            "recipient_address": recipient.address,
            "template_name": kind.template_name,
            "notification_format": kind.notification_format,
            "event_data_format": kind.event_data_format,
            "notification_interval": self.params.notification_interval,
            "aggregate_identifier": aggregate,
        })
    }

    fn event(&self, rng: &mut StdRng) -> NewEvent {
        let kind = &FEEDS[self.feed_weights.sample(rng)];
        let asn_index = self.asn_weights.sample(rng);
        let net = &self.networks[asn_index];
        let host = rng.gen_range(1..net.v4_size.max(2) - 1);
        let (source_ip, source_network) = if rng.gen_bool(self.params.ipv6_share) {
            let ip = Ipv6Addr::new(
                0x2001,
                0xdb8,
                net.v6_index,
                0,
                0,
                0,
                0,
                rng.gen_range(1..0xffff),
            );
            (IpAddr::V6(ip), format!("2001:db8:{:x}::/48", net.v6_index))
        } else {
            (
                IpAddr::V4(Ipv4Addr::from(net.v4_base + host)),
                format!("{}/{}", Ipv4Addr::from(net.v4_base), net.v4_prefix),
            )
        };
        let time_observation = self.params.time_observation;
        let time_source = time_observation - Duration::seconds(rng.gen_range(60..6 * 3600));
        let source_port = match kind.source_port {
            0 => rng.gen_range(1024..65535),
            p => i32::from(p),
        };
        let dashed = source_ip.to_string().replace(['.', ':'], "-");
        let source_reverse_dns = rng
            .gen_bool(0.5)
            .then(|| format!("{dashed}.dyn.as{}.example.net", net.asn));
        let cc = if rng.gen_bool(0.9) {
            "DE"
        } else {
            *["AT", "NL", "FR", "PL"].choose(rng).expect("non-empty")
        };

        let mut extra = serde_json::Map::new();
        let (identifier, malware, destination) = match kind.feed_name {
            "Open-Redis" => {
                extra.insert(
                    "version".into(),
                    json!(["5.0.7", "6.0.16", "7.0.11"].choose(rng)),
                );
                extra.insert("mode".into(), json!("standalone"));
                extra.insert("os".into(), json!("Linux 5.4.0-150-generic x86_64"));
                extra.insert("role".into(), json!("master"));
                extra.insert("connected_clients".into(), json!(rng.gen_range(1..40)));
                (kind.classification_identifier.to_string(), None, None)
            }
            "DNS-open-resolvers" => {
                extra.insert(
                    "min_amplification".into(),
                    json!((rng.gen_range(100..5000) as f64) / 100.0),
                );
                extra.insert(
                    "dns_version".into(),
                    json!(["9.11.4-P2-RedHat", "dnsmasq-2.80", "unbound 1.9.0"].choose(rng)),
                );
                (kind.classification_identifier.to_string(), None, None)
            }
            "Open-SNMP" => {
                let desc = [
                    "Linux rtr-gw 4.14.0 #1 SMP mips",
                    "Cisco IOS Software, C2960 Software (C2960-LANBASEK9-M), Version 12.2(55)SE",
                    "RouterOS RB750Gr3",
                ];
                extra.insert("system_desc".into(), json!(desc.choose(rng)));
                extra.insert("sysname".into(), json!(format!("rtr-{}", host % 97)));
                extra.insert("version".into(), json!(2));
                (kind.classification_identifier.to_string(), None, None)
            }
            "Ssl-Freak-Scan" => {
                extra.insert(
                    "subject_common_name".into(),
                    json!(format!(
                        "mail{}.customer{}.example.com",
                        host % 7,
                        asn_index
                    )),
                );
                extra.insert("issuer_common_name".into(), json!("Example Test CA"));
                extra.insert("handshake".into(), json!("TLSv1.0"));
                extra.insert("cipher_suite".into(), json!("TLS_RSA_WITH_AES_128_CBC_SHA"));
                extra.insert("freak_vulnerable".into(), json!(true));
                extra.insert(
                    "freak_cipher_suite".into(),
                    json!("TLS_RSA_EXPORT_WITH_DES40_CBC_SHA"),
                );
                (kind.classification_identifier.to_string(), None, None)
            }
            _ => {
                let malware = *MALWARE.choose(rng).expect("non-empty");
                extra.insert("os.name".into(), json!(["Windows", "Linux"].choose(rng)));
                extra.insert("connection_count".into(), json!(rng.gen_range(1..200)));
                let sinkhole = Ipv4Addr::new(198, 19, 255, rng.gen_range(1..255));
                (
                    malware.to_string(),
                    Some(malware.to_string()),
                    Some((IpAddr::V4(sinkhole), 80, "sinkhole.example.org".to_string())),
                )
            }
        };

        let first = self.recipient_of(asn_index);
        let mut directives = vec![self.directive(kind, first, net.asn)];
        if rng.gen_bool(self.params.two_directive_share) {
            let n = self.recipients.len();
            let second = (first + rng.gen_range(1..n)) % n;
            directives.push(self.directive(kind, second, net.asn));
        }
        extra.insert(
            "certbund".into(),
            json!({ "source_directives": directives }),
        );

        let raw_line = format!(
            "\"{}\",\"{}\",\"{}\",\"{}\",\"{}\",\"{}\",\"{}\"\n",
            time_source.format("%Y-%m-%d %H:%M:%S"),
            source_ip,
            kind.protocol_transport,
            source_port,
            source_reverse_dns.as_deref().unwrap_or(""),
            identifier,
            net.asn,
        );
        NewEvent {
            time_source,
            time_observation,
            feed_name: kind.feed_name.to_string(),
            feed_provider: "Shadowserver".to_string(),
            feed_accuracy: 100.0,
            classification_taxonomy: kind.classification_taxonomy.to_string(),
            classification_type: kind.classification_type.to_string(),
            classification_identifier: identifier,
            protocol_transport: kind.protocol_transport.to_string(),
            protocol_application: kind.protocol_application.to_string(),
            source_ip,
            source_port,
            source_asn: net.asn,
            source_network,
            source_geolocation_cc: cc.to_string(),
            source_reverse_dns,
            destination_ip: destination.as_ref().map(|d| d.0),
            destination_port: destination.as_ref().map(|d| d.1),
            destination_fqdn: destination.map(|d| d.2),
            malware_name: malware,
            raw: base64(raw_line.as_bytes()),
            extra: Value::Object(extra),
        }
    }
}

/// Inserts `events` into the table `events` with `COPY … FROM STDIN`
/// (text format, every value escaped), `batch` rows per COPY statement.
/// Row triggers fire as for INSERT. Returns the number of rows inserted.
pub async fn insert(
    client: &Client,
    events: impl IntoIterator<Item = NewEvent>,
    batch: usize,
) -> Result<u64, SandboxError> {
    insert_into(client, "events", events, batch).await
}

/// [`insert`] into another table with the [`INSERT_COLUMNS`]. `table` is
/// quoted as one identifier.
pub async fn insert_into(
    client: &Client,
    table: &str,
    events: impl IntoIterator<Item = NewEvent>,
    batch: usize,
) -> Result<u64, SandboxError> {
    let columns = INSERT_COLUMNS
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let statement = format!("COPY {} ({columns}) FROM STDIN", quote_ident(table));
    let batch = batch.max(1);
    let mut total = 0;
    let mut events = events.into_iter().peekable();
    let mut buf = Vec::new();
    while events.peek().is_some() {
        buf.clear();
        for event in events.by_ref().take(batch) {
            copy_row(&mut buf, &event);
        }
        let sink = client.copy_in::<_, Cursor<Vec<u8>>>(&statement).await?;
        futures::pin_mut!(sink);
        sink.send(Cursor::new(std::mem::take(&mut buf))).await?;
        total += sink.finish().await?;
    }
    Ok(total)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One row in COPY text format: tab-separated, `\N` for NULL, backslash
/// escapes for the characters the format treats specially.
fn copy_row(buf: &mut Vec<u8>, e: &NewEvent) {
    let ts = |t: &DateTime<Utc>| Some(t.to_rfc3339_opts(SecondsFormat::Micros, false));
    let fields: [Option<String>; INSERT_COLUMNS.len()] = [
        ts(&e.time_source),
        ts(&e.time_observation),
        Some(e.feed_name.clone()),
        Some(e.feed_provider.clone()),
        Some(e.feed_accuracy.to_string()),
        Some(e.classification_taxonomy.clone()),
        Some(e.classification_type.clone()),
        Some(e.classification_identifier.clone()),
        Some(e.protocol_transport.clone()),
        Some(e.protocol_application.clone()),
        Some(e.source_ip.to_string()),
        Some(e.source_port.to_string()),
        Some(e.source_asn.to_string()),
        Some(e.source_network.clone()),
        Some(e.source_geolocation_cc.clone()),
        e.source_reverse_dns.clone(),
        e.destination_ip.map(|ip| ip.to_string()),
        e.destination_port.map(|p| p.to_string()),
        e.destination_fqdn.clone(),
        e.malware_name.clone(),
        Some(e.raw.clone()),
        Some(e.extra.to_string()),
    ];
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            buf.push(b'\t');
        }
        match field {
            None => buf.extend_from_slice(b"\\N"),
            Some(value) => copy_escape(buf, value),
        }
    }
    buf.push(b'\n');
}

fn copy_escape(buf: &mut Vec<u8>, value: &str) {
    for &b in value.as_bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(b),
        }
    }
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A one-line summary of a feed's shape (for the demo's and bench's logs).
pub fn describe(events: &[NewEvent]) -> String {
    let directives: usize = events.iter().map(|e| e.directives().len()).sum();
    let two = events.iter().filter(|e| e.directives().len() == 2).count();
    let mut asns: Vec<i32> = events.iter().map(|e| e.source_asn).collect();
    asns.sort_unstable();
    asns.dedup();
    format!(
        "{} events, {} directives ({} events with two), {} ASNs",
        events.len(),
        directives,
        two,
        asns.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn copy_escaping() {
        let mut buf = Vec::new();
        copy_escape(&mut buf, "a\tb\nc\\d\re\\N");
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\re\\\\N");
    }

    #[test]
    fn asn_ranges() {
        assert_eq!(asn_number(0), 64496);
        assert_eq!(asn_number(15), 64511);
        assert_eq!(asn_number(16), 65536);
        assert_eq!(asn_number(31), 65551);
        assert_eq!(asn_number(32), 64512);
        assert_eq!(asn_number(32 + 1022), 65534);
        assert_eq!(asn_number(32 + 1023), 65552);
    }
}
