//! STUN Send and Data indications in the kernel (RFC 8656 §11).
//!
//! A client's Send indication to a peer IP with a permission leaves as the bare DATA value from
//! the relayed address (§11.2); a peer's datagram to an allocation without a channel for it
//! reaches the client as a Data indication (§11.3). Only plain indications are handled here
//! (a FINGERPRINT is checked): anything unusual (DONT-FRAGMENT, a FINGERPRINT that does not
//! verify, an unknown comprehension-required attribute, lengths that disagree, ...) is passed
//! to the socket path, which applies the RFC in full.
//!
//! All parsing goes through the context's load helpers (variable offsets, bounds checked);
//! only fixed offsets are written directly after the frame is resized.

use aya_ebpf::helpers::{bpf_get_prandom_u32, generated::bpf_loop};
use relay_common::{
    ip_field, ipv4_field, Permission, Reason, ToRelay, FAMILY_IPV4, FAMILY_IPV6, FLAG_ENABLED,
    FLAG_TRANSLATE,
};

use crate::{
    checksum::{word, Delta},
    context::Packet,
    forward::{payload_offset, rewrite, usable, Forward, Plan, Resize},
    headers::{permission_key, Frame, UdpDatagram, UDP_HDR_LEN},
    maps::{count_allocation, lookup, next_hop, peer_allowed_cached, PERMISSIONS},
};

/// STUN header length (RFC 8489 §5).
const STUN_HEADER_LEN: usize = 20;
/// The magic cookie, as the bytes on the wire.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Message type of a Send indication (method 0x006, class indication) and of a Data
/// indication (method 0x007).
pub const SEND_INDICATION: [u8; 2] = [0x00, 0x16];
const DATA_INDICATION: [u8; 2] = [0x00, 0x17];
const XOR_PEER_ADDRESS: u16 = 0x0012;
const DATA: u16 = 0x0013;
const FINGERPRINT: u16 = 0x8028;
/// Attributes a Send indication the kernel forwards may carry: XOR-PEER-ADDRESS, DATA and a
/// few comprehension-optional ones (SOFTWARE, ...). More go to the socket path.
const MAX_ATTRIBUTES: usize = 6;
/// Longest framing in front of DATA's value the kernel strips.
const MAX_PREFIX: usize = 96;
/// Longest tail after DATA's value (its padding and trailing optional attributes).
const MAX_SUFFIX: usize = 32;
/// Most words one [`sum_removed_words`] call sums: the longer of prefix and tail.
const MAX_SUMMED_WORDS: usize = MAX_PREFIX / 4;
/// Longest message (up to its FINGERPRINT) whose fingerprint the kernel checks: a full
/// 1500-byte frame's worth; longer fingerprinted indications go to the socket path.
const MAX_FINGERPRINTED: usize = 1_500;
/// XORed into the CRC-32 of a FINGERPRINT (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// CRC-32 (ISO-HDLC, reflected, polynomial 0xEDB88320) by byte, computed at build time.
static CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}
/// Framing in front of the data of a Data indication: STUN header, XOR-PEER-ADDRESS (IPv4 or
/// IPv6), DATA's attribute header.
const DATA_FRAMING_V4: usize = STUN_HEADER_LEN + 4 + 8 + 4;
const DATA_FRAMING_V6: usize = STUN_HEADER_LEN + 4 + 20 + 4;

/// A Send indication the kernel may forward.
pub struct Send {
    /// The peer (map fields, network order) and its family.
    peer_ip: [u32; 4],
    peer_family: u8,
    peer_port: u16,
    /// Offset of DATA's value from the start of the UDP payload, and its length. 16 bits, as
    /// every offset in a UDP payload: the entry point keeps this struct on its stack, which
    /// the verifier limits.
    data_at: u16,
    data_len: u16,
    /// Offset of the FINGERPRINT attribute, 0 without one.
    fingerprint_at: u16,
    /// Checksum change of the UDP payload when only DATA's value stays: every byte in front of
    /// it and after it leaves.
    removed: Delta,
}

/// The permission a Send indication needs (RFC 8656 §11.2): of the allocation's relayed
/// address of the peer's family (without one the socket path answers), for the peer's IP.
/// A subprogram of its own, called from the entry point: its key and the digest check stack
/// on neither the entry point's frame nor [`send_to_peer`]'s.
#[inline(never)]
pub fn send_permission(relay: &ToRelay, send: &Send) -> Result<&'static Permission, Reason> {
    if relay.flags & FLAG_ENABLED == 0 {
        return Err(Reason::PassDisabled);
    }
    let family = send.peer_family;
    let Some((relayed_ip, relayed_port)) = relay.relayed(family) else {
        return Err(Reason::PassNoPermission);
    };
    let key = permission_key(*relayed_ip, send.peer_ip, relayed_port, family);
    lookup(&PERMISSIONS, &key)?.ok_or(Reason::PassNoPermission)
}

/// Client → peer: a Send indication (parsed by [`parse_send`]) from a client with an
/// allocation on this listener (`relay`).
#[inline(never)]
pub fn send_to_peer<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    relay: &ToRelay,
    send: &Send,
    permission: &Permission,
) -> Result<Forward, Reason> {
    let family = send.peer_family;
    let Some((relayed_ip, relayed_port)) = relay.relayed(family) else {
        return Err(Reason::PassNoPermission);
    };
    usable(permission.flags, permission.expires_at_ns)?;
    if !peer_allowed_cached(family, &send.peer_ip, permission.peer_hop) {
        return Err(Reason::PassPolicyDenied);
    }
    let hop = next_hop(permission.peer_hop).ok_or(Reason::PassNoNextHop)?;

    let (data_at, data_len) = (usize::from(send.data_at), usize::from(send.data_len));
    let data_end = data_at + data_len;
    let frame_len = ctx.data_end() - ctx.data();
    let plan = Plan {
        src_ip: relayed_ip,
        dst_ip: &send.peer_ip,
        src_port: relayed_port,
        dst_port: send.peer_port,
        new_udp_len: UDP_HDR_LEN + data_len,
        data: send.removed,
        trim: frame_len - (udp.payload_offset + data_end),
        grow: 0,
        resize: Resize::Strip(data_at as u32),
        out_v6: family != FAMILY_IPV4,
    };
    let egress = rewrite(ctx, udp, &plan, hop)?;
    count_allocation(permission.counters, true, data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardSendToPeer,
        egress,
    })
}

/// What the word-summing loop body needs; `bpf_loop` hands it back by pointer.
#[repr(C)]
struct SumState<'a, C> {
    ctx: &'a C,
    /// Offset of the first word in the frame.
    base: usize,
    sum: Delta,
    failed: u32,
}

/// One word leaving the checksummed data: `bpf_loop` calls it once per word, and the verifier
/// checks it once, however many words there are.
extern "C" fn remove_word<C: Packet>(index: u64, state: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `SumState` pointer `sum_removed_words` gave it,
    // which lives in its caller's frame for the whole loop.
    let state = unsafe { &mut *state.cast::<SumState<'_, C>>() };
    let mut w = [0u8; 4];
    if !state.ctx.load(state.base + (index as usize) * 4, &mut w) {
        state.failed = 1;
        return 1;
    }
    state.sum.remove(u16::from_ne_bytes([w[0], w[1]]));
    state.sum.remove(u16::from_ne_bytes([w[2], w[3]]));
    0
}

/// Accounts for `words` whole words at frame offset `base` leaving the checksummed data.
/// `false` if they are not all inside the frame.
#[inline(always)]
fn sum_removed_words<C: Packet>(ctx: &C, base: usize, words: usize, sum: &mut Delta) -> bool {
    if words == 0 {
        return true;
    }
    if words > MAX_SUMMED_WORDS {
        return false;
    }
    let mut state = SumState {
        ctx,
        base,
        sum: *sum,
        failed: 0,
    };
    // SAFETY: the callback is an `extern "C" fn(u64, *mut c_void) -> i64` as the helper
    // expects, and `state` outlives the call.
    let looped = unsafe {
        bpf_loop(
            words as u32,
            remove_word::<C> as *mut core::ffi::c_void,
            (&mut state as *mut SumState<'_, C>).cast(),
            0,
        )
    };
    if looped < 0 || state.failed != 0 {
        return false;
    }
    *sum = state.sum;
    true
}

/// The checksum change of a Send indication's UDP payload when only DATA's value stays
/// ([`Send::removed`]). Its own subprogram, called from the entry point: the word loop's
/// frames then stack on neither [`parse_send`]'s nor [`send_to_peer`]'s.
#[inline(never)]
pub fn sum_framing<C: Packet>(
    ctx: &C,
    payload_offset: usize,
    payload_len: usize,
    send: &mut Send,
) -> Result<(), Reason> {
    const UNSUPPORTED: Reason = Reason::PassStunUnsupported;
    let (data_at, data_len, end) = (
        usize::from(send.data_at),
        usize::from(send.data_len),
        payload_len,
    );
    // Checksum: every word in front of the data leaves (the framing is a multiple of four
    // bytes, so the data keeps its word alignment), and so do the bytes after it: the padding
    // inside the last word the data ends in, then whole words of trailing attributes.
    // Offsets from the UDP header decide which half of a checksum word a byte is; the header
    // is 8 bytes, so the payload offset's parity is the same.
    let mut removed = Delta::new();
    if !sum_removed_words(ctx, payload_offset, data_at / 4, &mut removed) {
        return Err(UNSUPPORTED);
    }
    let data_end = data_at + data_len;
    let aligned_end = data_end.next_multiple_of(4);
    if aligned_end > data_end {
        let word_start = aligned_end - 4;
        let mut w = [0u8; 4];
        if !ctx.load(payload_offset + word_start, &mut w) {
            return Err(UNSUPPORTED);
        }
        for (i, byte) in w.iter().enumerate() {
            if word_start + i >= data_end {
                removed.remove_byte(*byte, (word_start + i).is_multiple_of(2));
            }
        }
    }
    let trailing = (end - aligned_end) / 4;
    if !sum_removed_words(ctx, payload_offset + aligned_end, trailing, &mut removed) {
        return Err(UNSUPPORTED);
    }
    send.removed = removed;
    Ok(())
}

/// A message with a wrong fingerprint is no STUN message (RFC 8489 §7.3): the socket path
/// decides what it is. Checked after parsing, not inside it, where every path through the
/// attribute loop would make the verifier walk the CRC loop again; and called from the entry
/// point, not from [`send_to_peer`], so the CRC loop's frames never stack on that one's.
#[inline(always)]
pub fn check_fingerprint<C: Packet>(ctx: &C, udp: &UdpDatagram, send: &Send) -> Result<(), Reason> {
    let at = usize::from(send.fingerprint_at);
    if at != 0 && !fingerprint_matches(ctx, udp, at) {
        return Err(Reason::PassStunUnsupported);
    }
    Ok(())
}

/// The attribute walk of [`parse_send`]; `bpf_loop` hands it back by pointer. Offsets are
/// from the start of the STUN message, 0 for an attribute not (yet) seen. All are `u16` (a
/// UDP payload is shorter than 64 KiB): the verifier knows nothing else of what the loop
/// left, and a 16-bit load is bounded by itself.
#[repr(C)]
struct AttributeWalk<'a, C> {
    ctx: &'a C,
    /// Offset of the STUN message in the frame.
    base: u16,
    /// End of the message (header plus its length field).
    end: u16,
    /// The next attribute's header.
    offset: u16,
    peer_at: u16,
    peer_len: u16,
    data_at: u16,
    data_len: u16,
    fingerprint_at: u16,
    /// Set when the message is one for the socket path.
    unsupported: u16,
}

/// One attribute of a Send indication (RFC 8489 §14): the verifier checks it once. As an
/// unrolled loop, every combination of where XOR-PEER-ADDRESS, DATA and the others sit was a
/// state of its own through the rest of the program (several times the instructions).
extern "C" fn next_attribute<C: Packet>(_index: u64, walk: *mut core::ffi::c_void) -> i64 {
    const STOP: i64 = 1;
    // SAFETY: `bpf_loop` passes back the `AttributeWalk` pointer `parse_send` gave it, which
    // lives in that function's frame for the whole loop.
    let walk = unsafe { &mut *walk.cast::<AttributeWalk<'_, C>>() };
    if walk.offset >= walk.end {
        return STOP;
    }
    let mut attribute = [0u8; 4];
    if !walk.ctx.load(
        usize::from(walk.base) + usize::from(walk.offset),
        &mut attribute,
    ) {
        walk.unsupported = 1;
        return STOP;
    }
    let kind = u16::from_be_bytes([attribute[0], attribute[1]]);
    let len = u16::from_be_bytes([attribute[2], attribute[3]]);
    let value = walk.offset + 4;
    // In 32 bits: a length of 0xfffd..=0xffff padded in 16 would wrap to 0.
    let next = u32::from(value) + u32::from(len).next_multiple_of(4);
    // FINGERPRINT must be the last attribute (RFC 8489 §14.7).
    if next > u32::from(walk.end) || walk.fingerprint_at != 0 {
        walk.unsupported = 1;
        return STOP;
    }
    match kind {
        XOR_PEER_ADDRESS if walk.peer_at == 0 => (walk.peer_at, walk.peer_len) = (value, len),
        DATA if walk.data_at == 0 => (walk.data_at, walk.data_len) = (value, len),
        FINGERPRINT if len == 4 => walk.fingerprint_at = walk.offset,
        // A repeated one, DONT-FRAGMENT, any other comprehension-required attribute: the
        // socket path's.
        XOR_PEER_ADDRESS | DATA | FINGERPRINT => {
            walk.unsupported = 1;
            return STOP;
        }
        kind if kind < 0x8000 => {
            walk.unsupported = 1;
            return STOP;
        }
        // Comprehension-optional attributes may be ignored (RFC 8489 §14).
        _ => {}
    }
    // `next <= end`, a u16.
    walk.offset = next as u16;
    0
}

/// Reads a Send indication's header and attributes (RFC 8489 §5, §14; RFC 8656 §11.2).
#[inline(never)]
pub fn parse_send<C: Packet>(ctx: &C, udp: &UdpDatagram) -> Result<Send, Reason> {
    const UNSUPPORTED: Reason = Reason::PassStunUnsupported;
    let mut header = [0u8; STUN_HEADER_LEN];
    if !ctx.load(udp.payload_offset, &mut header) {
        return Err(UNSUPPORTED);
    }
    let message_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let end = STUN_HEADER_LEN + message_len;
    if [header[0], header[1]] != SEND_INDICATION
        || [header[4], header[5], header[6], header[7]] != MAGIC_COOKIE
        || !message_len.is_multiple_of(4)
        || end != udp.payload_len
    {
        return Err(UNSUPPORTED);
    }
    // `end` is the UDP payload's length, below 64 KiB; so is the payload's offset.
    let mut walk = AttributeWalk {
        ctx,
        base: udp.payload_offset as u16,
        end: end as u16,
        offset: STUN_HEADER_LEN as u16,
        peer_at: 0,
        peer_len: 0,
        data_at: 0,
        data_len: 0,
        fingerprint_at: 0,
        unsupported: 0,
    };
    // SAFETY: the callback is an `extern "C" fn(u64, *mut c_void) -> i64` as the helper
    // expects, and `walk` outlives the call.
    let looped = unsafe {
        bpf_loop(
            MAX_ATTRIBUTES as u32,
            next_attribute::<C> as *mut core::ffi::c_void,
            (&mut walk as *mut AttributeWalk<'_, C>).cast(),
            0,
        )
    };
    if looped < 0 || walk.unsupported != 0 {
        return Err(UNSUPPORTED);
    }
    let offset = usize::from(walk.offset);
    let (peer_at, peer_len) = (usize::from(walk.peer_at), usize::from(walk.peer_len));
    let (data_at, data_len) = (usize::from(walk.data_at), usize::from(walk.data_len));
    let fingerprint_at = usize::from(walk.fingerprint_at);
    if offset != end || peer_at == 0 || data_at == 0 || data_at > MAX_PREFIX {
        return Err(UNSUPPORTED);
    }
    if end - (data_at + data_len) > MAX_SUFFIX {
        return Err(UNSUPPORTED);
    }

    // XOR-PEER-ADDRESS (RFC 8489 §14.2): reserved byte, family, X-Port, X-Address. The peer's
    // family need not be the client's (RFC 8656 §7.2): the relayed address of the peer's
    // family sends it.
    let mut value = [0u8; 4];
    if !ctx.load(udp.payload_offset + peer_at, &mut value) {
        return Err(UNSUPPORTED);
    }
    let peer_family = match (value[1], peer_len) {
        (1, 8) => FAMILY_IPV4,
        (2, 20) => FAMILY_IPV6,
        _ => return Err(UNSUPPORTED),
    };
    let port = [value[2], value[3]];
    let peer_ip = if peer_family == FAMILY_IPV4 {
        let mut ip = [0u8; 4];
        if !ctx.load(udp.payload_offset + peer_at + 4, &mut ip) {
            return Err(UNSUPPORTED);
        }
        for i in 0..4 {
            ip[i] ^= MAGIC_COOKIE[i];
        }
        ipv4_field(ip)
    } else {
        let mut ip = [0u8; 16];
        if !ctx.load(udp.payload_offset + peer_at + 4, &mut ip) {
            return Err(UNSUPPORTED);
        }
        // The IPv6 address is XORed with the cookie and the transaction id.
        for i in 0..16 {
            ip[i] ^= if i < 4 {
                MAGIC_COOKIE[i]
            } else {
                header[4 + i]
            };
        }
        ip_field(ip)
    };
    let peer_port = [port[0] ^ MAGIC_COOKIE[0], port[1] ^ MAGIC_COOKIE[1]];
    if peer_port == [0, 0] {
        return Err(UNSUPPORTED);
    }
    Ok(Send {
        removed: Delta::new(),
        peer_ip,
        peer_family,
        peer_port: u16::from_ne_bytes(peer_port),
        // Below 64 KiB: offsets inside the UDP payload.
        data_at: data_at as u16,
        data_len: data_len as u16,
        fingerprint_at: fingerprint_at as u16,
    })
}

/// What the CRC loop body needs; `bpf_loop` hands it back by pointer.
#[repr(C)]
struct CrcState<'a, C> {
    ctx: &'a C,
    /// Offset of the message's first byte in the frame.
    base: usize,
    crc: u32,
    failed: u32,
}

/// One word of the CRC: `bpf_loop` calls it `at / 4` times, and the verifier checks it once,
/// however many words a message has.
extern "C" fn crc_word<C: Packet>(index: u64, state: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `CrcState` pointer `fingerprint_matches` gave it,
    // which lives in that function's frame for the whole loop.
    let state = unsafe { &mut *state.cast::<CrcState<'_, C>>() };
    let mut w = [0u8; 4];
    if !state.ctx.load(state.base + (index as usize) * 4, &mut w) {
        state.failed = 1;
        return 1;
    }
    let mut crc = state.crc;
    for byte in w {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    state.crc = crc;
    0
}

/// Whether the FINGERPRINT attribute at `at` (from the start of the UDP payload) holds the
/// CRC-32 of the message before it, XOR 0x5354554e (RFC 8489 §14.7).
#[inline(never)]
fn fingerprint_matches<C: Packet>(ctx: &C, udp: &UdpDatagram, at: usize) -> bool {
    if at > MAX_FINGERPRINTED || !at.is_multiple_of(4) {
        return false;
    }
    let mut state = CrcState {
        ctx,
        base: udp.payload_offset,
        crc: !0,
        failed: 0,
    };
    // SAFETY: the callback is an `extern "C" fn(u64, *mut c_void) -> i64` as the helper
    // expects, and `state` outlives the call.
    let looped = unsafe {
        bpf_loop(
            (at / 4) as u32,
            crc_word::<C> as *mut core::ffi::c_void,
            (&mut state as *mut CrcState<'_, C>).cast(),
            0,
        )
    };
    if looped < 0 || state.failed != 0 {
        return false;
    }
    let mut w = [0u8; 4];
    if !ctx.load(udp.payload_offset + at + 4, &mut w) {
        return false;
    }
    (!state.crc ^ FINGERPRINT_XOR) == u32::from_be_bytes(w)
}

/// Peer → client: a datagram from a peer with a permission but no channel, sent to the client
/// as a Data indication (RFC 8656 §11.3): XOR-PEER-ADDRESS and DATA, a fresh transaction id
/// from the kernel's random source, no FINGERPRINT (as the socket path: the client tells
/// TURN messages from others by the 5-tuple, not by a fingerprint).
#[inline(never)]
pub fn data_to_client<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    permission: &Permission,
) -> Result<Forward, Reason> {
    usable(permission.flags, permission.expires_at_ns)?;
    let hop = next_hop(permission.client_hop).ok_or(Reason::PassNoNextHop)?;
    // XOR-PEER-ADDRESS is of the peer's family, the datagram to the client of the client's.
    let v4 = udp.family() == FAMILY_IPV4;
    let out_v6 = v4 == (permission.flags & FLAG_TRANSLATE != 0);
    let framing = if v4 { DATA_FRAMING_V4 } else { DATA_FRAMING_V6 };
    let data_len = udp.payload_len;
    let padding = data_len.next_multiple_of(4) - data_len;
    let message_len = framing - STUN_HEADER_LEN + data_len + padding;
    let new_udp_len = UDP_HDR_LEN + framing + data_len + padding;
    if new_udp_len > 0xffff {
        return Err(Reason::PassFragNeeded);
    }

    // The framing as native reads of its wire bytes, a word (u32) at a time: STUN header,
    // XOR-PEER-ADDRESS, DATA's header. The zero padding changes no checksum.
    let cookie = u32::from_ne_bytes(MAGIC_COOKIE);
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let tid = unsafe {
        [
            bpf_get_prandom_u32(),
            bpf_get_prandom_u32(),
            bpf_get_prandom_u32(),
        ]
    };
    let (peer, _) = udp.addresses();
    let x_port = u16::from_ne_bytes(udp.udp.src_port) ^ u16::from_ne_bytes([0x21, 0x12]);
    let mut head = [0u32; DATA_FRAMING_V6 / 4];
    head[0] = pair(
        u16::from_ne_bytes(DATA_INDICATION),
        word(message_len as u16),
    );
    head[1] = cookie;
    head[2] = tid[0];
    head[3] = tid[1];
    head[4] = tid[2];
    let data_header = pair(word(DATA), word(data_len as u16));
    if v4 {
        head[5] = pair(word(XOR_PEER_ADDRESS), word(8));
        head[6] = pair(u16::from_ne_bytes([0, 1]), x_port);
        head[7] = peer[0] ^ cookie;
        head[8] = data_header;
    } else {
        // The IPv6 address is XORed with the cookie and the transaction id.
        head[5] = pair(word(XOR_PEER_ADDRESS), word(20));
        head[6] = pair(u16::from_ne_bytes([0, 2]), x_port);
        head[7] = peer[0] ^ cookie;
        head[8] = peer[1] ^ tid[0];
        head[9] = peer[2] ^ tid[1];
        head[10] = peer[3] ^ tid[2];
        head[11] = data_header;
    }
    let mut data = Delta::new();
    for (i, w) in head.iter().enumerate() {
        if 4 * i < framing {
            data.add(*w as u16);
            data.add((*w >> 16) as u16);
        }
    }

    let frame_len = ctx.data_end() - ctx.data();
    let plan = Plan {
        src_ip: &permission.listener_ip,
        dst_ip: &permission.client_ip,
        src_port: permission.listener_port,
        dst_port: permission.client_port,
        new_udp_len,
        data,
        trim: frame_len - (udp.payload_offset + data_len),
        grow: padding,
        resize: Resize::Insert(framing as u32),
        out_v6,
    };
    let egress = rewrite(ctx, udp, &plan, hop)?;
    let at = payload_offset(out_v6);
    if v4 {
        write_framing::<C, { DATA_FRAMING_V4 / 4 }>(ctx, at, &head)?;
    } else {
        write_framing::<C, { DATA_FRAMING_V6 / 4 }>(ctx, at, &head)?;
    }
    count_allocation(permission.counters, false, data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardDataToClient,
        egress,
    })
}

/// Two native words of wire bytes as one native u32 of the four bytes, in wire order.
#[inline(always)]
fn pair(first: u16, second: u16) -> u32 {
    let (a, b) = (first.to_ne_bytes(), second.to_ne_bytes());
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}

/// Writes the first `N` words of `head` at `payload_offset`, the start of the rewritten UDP
/// payload.
#[inline(always)]
fn write_framing<C: Packet, const N: usize>(
    ctx: &C,
    payload_offset: usize,
    head: &[u32; DATA_FRAMING_V6 / 4],
) -> Result<(), Reason> {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let slot = frame
        .ptr_at::<[u32; N]>(payload_offset)
        .ok_or(Reason::DropRewriteFailed)?
        .cast::<u32>();
    for (i, w) in head.iter().take(N).enumerate() {
        // SAFETY: `ptr_at` checked that `N` words lie inside the reloaded frame; `i < N`.
        unsafe { slot.add(i).write_unaligned(*w) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_table_gives_the_standard_crc32() {
        // CRC-32 of "123456789" is 0xCBF43926.
        let mut crc = !0u32;
        for byte in b"123456789" {
            crc = CRC_TABLE[((crc ^ u32::from(*byte)) & 0xff) as usize] ^ (crc >> 8);
        }
        assert_eq!(!crc, 0xcbf4_3926);
    }

    #[test]
    fn framing_lengths() {
        assert_eq!(DATA_FRAMING_V4, 36);
        assert_eq!(DATA_FRAMING_V6, 48);
        assert_eq!(word(0x0016).to_ne_bytes(), SEND_INDICATION);
        assert_eq!(
            pair(word(0x0017), word(0x0102)).to_ne_bytes(),
            [0x00, 0x17, 0x01, 0x02]
        );
    }
}
