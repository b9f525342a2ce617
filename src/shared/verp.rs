//! VERP bounce addresses that carry a notification's ticket (issue 19,
//! item 2), shared by the notifier and the router: the address format and its check. With `mailgend.verp` set
//! (`config::bounces`) every notification's envelope sender is
//! its VERP address (`notify::mail`), and `mailgend route` takes the
//! bounces to it (`route::verp`).
//!
//! A notification with ticket `20261203-10000042`, sent with the bounce
//! address `bounces@cert.example`, gets the envelope sender
//! `bounces+20261203-10000042-<mac>@cert.example`, where `<mac>` is the
//! first 10 bytes of HMAC-SHA-256 over the ticket with the site's key, in
//! lower-case hex (20 characters; the local part stays at 46 characters,
//! under RFC 5321's 64). A bounce to such an address names its ticket;
//! without the key nobody can make an address that names another ticket,
//! so forged bounces cannot be pinned on real notifications. Case is
//! ignored when reading, as some MTAs change it. Tickets are their text
//! (`20261203-10000042`), as in `sent.intelmq_ticket`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in the address.
const MAC_BYTES: usize = 10;

/// The site's VERP settings: the bounce address's local part and domain,
/// and the MAC key.
#[derive(Clone)]
pub struct Verp {
    local: String,
    domain: String,
    key: Vec<u8>,
}

impl PartialEq for Verp {
    fn eq(&self, other: &Self) -> bool {
        self.local == other.local && self.domain == other.domain && self.key == other.key
    }
}

impl Eq for Verp {}

impl std::fmt::Debug for Verp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "Verp({}@{})", self.local, self.domain)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerpError {
    #[error("bounce address {0:?} is not local@domain without '+'")]
    BadBase(String),
    #[error("the VERP key is shorter than 16 bytes")]
    ShortKey,
    #[error("{0:?} is not a bounce address of this site")]
    NotOurs(String),
    #[error("{0:?} does not carry a ticket and a MAC")]
    Malformed(String),
    #[error("{0:?}: the MAC does not match its ticket (forged or another key)")]
    Forged(String),
}

impl Verp {
    /// `base` is the bounce address (`bounces@cert.example`); `key` the
    /// secret (at least 16 bytes, e.g. 32 random bytes from a file).
    pub fn new(base: &str, key: &[u8]) -> Result<Verp, VerpError> {
        let (local, domain) = base
            .rsplit_once('@')
            .filter(|(l, d)| {
                !l.is_empty()
                    && !d.is_empty()
                    && !l.contains('+')
                    && !base.chars().any(|c| c.is_whitespace() || c.is_control())
            })
            .ok_or_else(|| VerpError::BadBase(base.to_string()))?;
        if key.len() < 16 {
            return Err(VerpError::ShortKey);
        }
        Ok(Verp {
            local: local.to_string(),
            domain: domain.to_string(),
            key: key.to_vec(),
        })
    }

    fn mac(&self, ticket: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(ticket.as_bytes());
        mac
    }

    /// The bounce address without a ticket (`bounces@cert.example`).
    pub fn base(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }

    /// Whether `address` has the form of one of our bounce addresses
    /// (`local+…@domain`, case ignored), whatever follows the `+`.
    pub fn is_ours(&self, address: &str) -> bool {
        !matches!(self.ticket(address), Err(VerpError::NotOurs(_)))
    }

    /// The envelope sender for a mail with `ticket`.
    pub fn address(&self, ticket: &str) -> String {
        let tag = self.mac(ticket).finalize().into_bytes();
        let hex: String = tag[..MAC_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}+{}-{hex}@{}", self.local, ticket, self.domain)
    }

    /// The ticket a bounce address carries, if the address is ours and its
    /// MAC is right.
    pub fn ticket(&self, address: &str) -> Result<String, VerpError> {
        let lower = address.trim().to_ascii_lowercase();
        let (local, domain) = lower
            .rsplit_once('@')
            .ok_or_else(|| VerpError::NotOurs(address.to_string()))?;
        let prefix = format!("{}+", self.local.to_ascii_lowercase());
        let tagged = match local.strip_prefix(&prefix) {
            Some(t) if domain == self.domain.to_ascii_lowercase() => t,
            _ => return Err(VerpError::NotOurs(address.to_string())),
        };
        let malformed = || VerpError::Malformed(address.to_string());
        let (ticket, hex) = tagged.rsplit_once('-').ok_or_else(malformed)?;
        let well_formed = ticket.len() == 17
            && ticket.as_bytes()[8] == b'-'
            && ticket
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 8 || b.is_ascii_digit());
        if !well_formed || hex.len() != 2 * MAC_BYTES {
            return Err(malformed());
        }
        let tag = (0..MAC_BYTES)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| malformed())?;
        self.mac(ticket)
            .verify_truncated_left(&tag)
            .map_err(|_| VerpError::Forged(address.to_string()))?;
        Ok(ticket.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verp() -> Verp {
        Verp::new("bounces@cert.example", b"0123456789abcdef-test-key").unwrap()
    }

    fn ticket() -> &'static str {
        "20261203-10000042"
    }

    #[test]
    fn an_address_names_its_ticket_and_fits_a_local_part() {
        let a = verp().address(ticket());
        assert!(a.starts_with("bounces+20261203-10000042-"), "{a}");
        assert!(a.ends_with("@cert.example"), "{a}");
        assert!(a.split('@').next().unwrap().len() <= 64);
        assert_eq!(verp().ticket(&a).unwrap(), ticket());
        // MTAs may change case.
        assert_eq!(verp().ticket(&a.to_uppercase()).unwrap(), ticket());
    }

    #[test]
    fn forged_foreign_and_malformed_addresses_are_refused() {
        let a = verp().address(ticket());
        let other_ticket = a.replace("10000042", "10000043");
        assert!(matches!(
            verp().ticket(&other_ticket),
            Err(VerpError::Forged(_))
        ));
        let other_key = Verp::new("bounces@cert.example", b"another key of 16+ bytes").unwrap();
        assert!(matches!(other_key.ticket(&a), Err(VerpError::Forged(_))));
        assert!(matches!(
            verp().ticket(&a.replace("cert.example", "evil.example")),
            Err(VerpError::NotOurs(_))
        ));
        assert!(matches!(
            verp().ticket("bounces+20261203-10000042@cert.example"),
            Err(VerpError::Malformed(_))
        ));
        assert!(matches!(
            verp().ticket("bounces+x-00112233445566778899@cert.example"),
            Err(VerpError::Malformed(_))
        ));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Verp::new("bounces+x@cert.example", b"0123456789abcdef").is_err());
        assert!(Verp::new("bounces", b"0123456789abcdef").is_err());
        assert_eq!(
            Verp::new("bounces@cert.example", b"short").unwrap_err(),
            VerpError::ShortKey
        );
        assert!(!format!("{:?}", verp()).contains("test-key"));
    }
}
