//! Data-plane decisions: where the bytes of a relayed datagram go, without copying them.
//!
//! ChannelData from a client (RFC 8656 §12.5) and a peer's datagram on a channel (RFC 8656
//! §12.6) are the per-packet load of a relay. For them the core does not build a payload: it
//! names the local socket, the destination and the part of the caller's buffer to send, and,
//! towards the client, the 4-byte ChannelData header to put in front of it. The IO layer
//! writes that header into headroom its receive buffers keep before every datagram, so the
//! payload is never copied in user space. Everything else (responses, Data indications, Send
//! indications, allocation and fast-path effects) still leaves as a [`super::Command`].

use std::{net::SocketAddr, ops::Range};

use crate::channel_data::CHANNEL_DATA_HEADER_LEN;
use crate::Transport;

/// Where one received datagram goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Send `data[payload]` (the application data of a ChannelData message) to `peer` from the
    /// relay socket bound on `relayed` (RFC 8656 §12.5).
    ToPeer {
        /// relayed transport address: the local socket to send from
        relayed: SocketAddr,
        /// peer transport address
        peer: SocketAddr,
        /// the bytes of the received datagram to send
        payload: Range<usize>,
    },
    /// Send `header` followed by the whole received datagram to `client` from the listener
    /// address it contacted (RFC 8656 §12.6).
    ToClient {
        /// listener (server) transport address: the local address to send from
        listener: SocketAddr,
        /// client transport address
        client: SocketAddr,
        /// the client's transport: over TCP/TLS the message goes on the client's connection,
        /// padded to a multiple of 4 bytes (RFC 8656 §12.5)
        transport: Transport,
        /// the ChannelData header to prepend
        header: [u8; CHANNEL_DATA_HEADER_LEN],
    },
}

impl Forward {
    /// The datagram this decision sends, as one new buffer (for tests and for callers without
    /// headroom; the daemon sends in place).
    pub fn to_vec(&self, data: &[u8]) -> Vec<u8> {
        match self {
            Forward::ToPeer { payload, .. } => {
                data.get(payload.clone()).unwrap_or_default().to_vec()
            }
            Forward::ToClient { header, .. } => {
                let mut out = Vec::with_capacity(header.len() + data.len());
                out.extend_from_slice(header);
                out.extend_from_slice(data);
                out
            }
        }
    }
}
