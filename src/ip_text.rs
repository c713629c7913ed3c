//! IP addresses as text without `fmt`: one goes into every access line and every
//! X-Forwarded-For, and IPv4 written by hand costs a fraction of `Display`.

use std::io::Write;
use std::net::IpAddr;

/// The text of an IP address, on the stack.
pub struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    pub fn new(ip: IpAddr) -> Self {
        let mut t = IpText {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                let mut ints = itoa::Buffer::new();
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b".");
                    }
                    t.push(ints.format(octet).as_bytes());
                }
            }
            // Rare, and its zero compression is worth leaving to the standard library.
            IpAddr::V6(v6) => {
                let mut cursor = std::io::Cursor::new(&mut t.buf[..]);
                let _ = write!(cursor, "{v6}");
                t.len = cursor.position() as usize;
            }
        }
        t
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_display_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.1.20.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }
}
