//! How a client reaches the relay.

use std::fmt;

/// The client-side transport of a 5-tuple (RFC 8656 §3.1, §5): UDP, TCP, or TLS over TCP. The
/// relayed side is always UDP (REQUESTED-TRANSPORT 17).
///
/// It is part of the 5-tuple: a UDP client and a TCP client with the same addresses (common
/// behind a NAT, which keeps separate port spaces per protocol) hold different allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Datagrams; the only transport the kernel fast path forwards.
    #[default]
    Udp,
    /// A TCP connection carrying framed STUN and ChannelData (RFC 8656 §12.5 padding).
    Tcp,
    /// TLS over TCP (RFC 8489 §6.2.2), framed like TCP inside the TLS stream.
    Tls,
}

impl Transport {
    /// The lowercase name used in metrics labels, logs and the admin view.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Whether messages arrive as a byte stream (framed by length, ChannelData padded to a
    /// multiple of 4 bytes, RFC 8656 §12.5) rather than one per datagram.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
