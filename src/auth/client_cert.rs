//! Who a client certificate names: read once per connection, after the
//! handshake verified the certificate against the listener's CA.

use x509_parser::extensions::GeneralName;

/// The names of a verified client certificate.
#[derive(Debug)]
pub struct ClientIdentity {
    /// subjectAltName entries: DNS names (lower case), URIs (a SPIFFE id),
    /// e-mail addresses and IP addresses, as text, in the certificate's order.
    pub sans: Vec<Box<str>>,
    /// The subject's common name, if it has one.
    pub common_name: Option<Box<str>>,
}

impl ClientIdentity {
    /// `None` for DER that does not parse (rustls verified the chain, so
    /// this is a certificate the parser cannot read, not a forged one).
    pub fn from_der(der: &[u8]) -> Option<ClientIdentity> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(extension)) = certificate.subject_alternative_name() {
            for name in &extension.value.general_names {
                let text: Option<String> = match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    GeneralName::RFC822Name(mail) => Some((*mail).to_owned()),
                    GeneralName::IPAddress(octets) => ip_text(octets),
                    _ => None,
                };
                sans.extend(text.map(String::into_boxed_str));
            }
        }
        let common_name = certificate.subject().iter_common_name().find_map(|cn| cn.as_str().ok()).map(|cn| cn.into());
        Some(ClientIdentity { sans, common_name })
    }

    /// The name it is known by (access log, forwarded header): its first
    /// subjectAltName, else its common name.
    pub fn name(&self) -> &str {
        self.sans.first().map(|san| &**san).or(self.common_name.as_deref()).unwrap_or("-")
    }

    /// The first of its names a pattern admits: exact (DNS names compared
    /// without case), or `*.example.com` for exactly one DNS label under
    /// `example.com`. Only subjectAltNames count: the common name is not a
    /// name a CA vouches for in the same way.
    pub fn matching(&self, patterns: &[String]) -> Option<&str> {
        self.sans.iter().map(|san| &**san).find(|san| patterns.iter().any(|pattern| admits(pattern, san)))
    }
}

fn admits(pattern: &str, san: &str) -> bool {
    // A URI (a SPIFFE id) or an e-mail address: exactly, case and all.
    if san.contains([':', '@', '/']) {
        return pattern == san;
    }
    match pattern.strip_prefix("*.") {
        Some(parent) => san
            .split_once('.')
            // A DNS label: not the head of a URI or an e-mail address.
            .is_some_and(|(label, rest)| {
                !label.is_empty() && !label.contains([':', '/', '@']) && rest.eq_ignore_ascii_case(parent)
            }),
        None => pattern.eq_ignore_ascii_case(san),
    }
}

fn ip_text(octets: &[u8]) -> Option<String> {
    match octets.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(octets).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(octets).ok()?).to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_matched_exactly_or_one_label_under_a_wildcard() {
        let identity = ClientIdentity {
            sans: vec!["bot-7.ops.corp".into(), "spiffe://corp/ops/bot-7".into()],
            common_name: Some("someone".into()),
        };
        assert_eq!(identity.matching(&["*.ops.corp".to_owned()]), Some("bot-7.ops.corp"));
        assert_eq!(identity.matching(&["spiffe://corp/ops/bot-7".to_owned()]), Some("spiffe://corp/ops/bot-7"));
        assert_eq!(identity.matching(&["*.corp".to_owned()]), None);
        let uri = ClientIdentity { sans: vec!["https://a.ops.corp".into()], common_name: None };
        assert_eq!(uri.matching(&["*.ops.corp".to_owned()]), None);
        assert_eq!(identity.matching(&["someone".to_owned()]), None);
        assert_eq!(identity.name(), "bot-7.ops.corp");
    }
}
