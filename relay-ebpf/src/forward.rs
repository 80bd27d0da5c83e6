//! Classification of one UDP datagram and the rewrite shared by every direction.
//!
//! Order of work, chosen so that nothing is modified until forwarding is certain:
//! parse → map lookup → flags and expiry → peer policy → next hop (resolved by userspace, no
//! FIB lookup) → MTU and egress checks → compute new headers and checksums → shrink/grow the
//! frame → reload pointers, bounds-check, write headers.
//!
//! IP header fields of what the kernel path sends (RFC 8656 §14 "alternate behaviour", the same
//! as the socket path's sockets produce): DSCP and ECN 0, TTL / hop limit 64, IPv4 DF set with
//! IP ID 0 (the datagram fits the egress MTU, checked here; RFC 6864 atomic datagrams), IPv6
//! flow label 0.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use relay_common::{
    ip_octets, NextHop, Permission, Reason, ToClient, ToPeer, ToRelay, CHANNEL_DATA_HEADER_LEN,
    FAMILY_IPV4, FAMILY_IPV6, FLAG_ENABLED, FLAG_HAIRPIN, FLAG_TRANSLATE, FORWARD_TTL,
    NEXT_HOP_VALID,
};

use crate::{
    channel::{self, ChannelData, Classified},
    checksum::{ipv4_header_checksum, word, Delta},
    context::Packet,
    headers::{
        peer_key, permission_key, EthHdr, Frame, IpHeader, Ipv4Hdr, Ipv6Hdr, UdpDatagram,
        ETH_HDR_LEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_UDP, IPV4_HDR_LEN, IPV6_HDR_LEN, UDP_HDR_LEN,
    },
    indication::{
        check_fingerprint, data_to_client, parse_send, send_permission, send_to_peer, sum_framing,
        SEND_INDICATION,
    },
    maps::{
        count_allocation, is_listener_port, lookup, next_hop, peer_allowed_cached, CHANNELS,
        CLIENTS, PEERS, PERMISSIONS,
    },
};

/// IPv4 flags/fragment offset of every datagram the kernel sends: DF, not a fragment.
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// First word of every IPv6 header the kernel sends: version 6, traffic class 0, flow label 0.
const IPV6_FIRST_WORD: [u8; 4] = [0x60, 0, 0, 0];

/// A frame rewritten and ready to leave through `egress`.
pub struct Forward {
    pub reason: Reason,
    pub egress: u32,
}

/// Decides what to do with the frame under `ctx`, rewriting it when it is forwarded.
/// `Err` carries the reason to pass (or, for [`Reason::DropRewriteFailed`], to drop) it.
#[inline(always)]
pub fn process<C: Packet>(ctx: &mut C) -> Result<Forward, Reason> {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let udp = frame.udp()?;

    // Client → peer: ChannelData to a listener (RFC 8656 §12.5). Only datagrams to a
    // listener port are read as ChannelData: a peer's payload may start with any bits.
    // The first four payload bytes are classified before the listener port is looked up:
    // the answer only matters for what looks like ChannelData, and most peer traffic (RTP,
    // DTLS, STUN) does not, so it skips a hash lookup.
    let mut miss = Reason::PassUdpNoMatch;
    // SAFETY: `ptr_at` checked that four bytes lie inside the frame.
    let first = frame
        .ptr_at::<[u8; 4]>(udp.payload_offset)
        .map(|header| unsafe { *header });
    let classified = match first {
        Some(header) => channel::classify(header, udp.payload_len),
        None => Classified::NotChannelData,
    };
    let send_indication = matches!(classified, Classified::NotChannelData)
        && first.is_some_and(|header| [header[0], header[1]] == SEND_INDICATION);
    let to_listener = (send_indication || !matches!(classified, Classified::NotChannelData))
        && is_listener_port(u16::from_ne_bytes(udp.udp.dst_port));
    if to_listener {
        match classified {
            // RFC 8656 §11.2: a Send indication from a client.
            Classified::NotChannelData => match lookup_client(&udp)? {
                Some(relay) => {
                    // Parsed here, not inside `send_to_peer`: one subprogram deep at a time
                    // keeps the combined stack within the verifier's 512 bytes.
                    let mut send = parse_send(ctx, &udp)?;
                    check_fingerprint(ctx, &udp, &send)?;
                    let permission = send_permission(relay, &send)?;
                    sum_framing(ctx, udp.payload_offset, udp.payload_len, &mut send)?;
                    return send_to_peer(ctx, &udp, relay, &send, permission);
                }
                // Not a client of this relay: maybe a peer's datagram (below).
                None => miss = Reason::PassNoBinding,
            },
            Classified::Bad(reason) => miss = reason,
            Classified::ChannelData(message) => {
                if let Some(entry) = lookup_channel(&udp, message.channel)? {
                    // Called from here, not from `to_peer`: each direction is one subprogram
                    // deep, which keeps the combined stack within the verifier's 512 bytes.
                    if entry.flags & FLAG_HAIRPIN != 0 {
                        let target = hairpin_target(entry, other_family(&udp, entry.flags))?;
                        return hairpin(ctx, &udp, &message, entry, target);
                    }
                    return to_peer(ctx, &udp, &message, entry);
                }
                miss = Reason::PassNoBinding;
            }
        }
    }

    // Peer → client: a datagram to a relayed address from a peer with a bound channel
    // (RFC 8656 §12.6).
    if let Some(entry) = lookup_peer(&udp)? {
        // A hairpin entry's "peer" is one of this relay's own relayed addresses: only the
        // program itself delivers such traffic (see `hairpin`). From the wire it is a spoofed
        // local source: the stack drops it as martian (IPv4) or hands it to the relay socket,
        // where it is ordinary TURN source spoofing (permissions are per IP, RFC 8656 §9).
        // Either way, not the kernel's to forward.
        if entry.flags & FLAG_HAIRPIN != 0 {
            return Err(miss);
        }
        return to_client(ctx, &udp, entry);
    }
    // No channel: a peer with a permission gets a Data indication (RFC 8656 §11.3).
    if let Some(permission) = lookup_permission(&udp)? {
        return data_to_client(ctx, &udp, permission);
    }
    Err(miss)
}

// Map lookups, each building its key; each value is this CPU's stable copy (`maps::lookup`).
type Found<T> = Result<Option<&'static T>, Reason>;

/// The channel binding of a client's ChannelData on `channel`.
#[inline(always)]
fn lookup_channel(udp: &UdpDatagram, channel: u16) -> Found<ToPeer> {
    lookup(&CHANNELS, &udp.channel_key(channel))
}

/// The channel binding of a peer's datagram.
#[inline(always)]
fn lookup_peer(udp: &UdpDatagram) -> Found<ToClient> {
    lookup(&PEERS, &udp.peer_key())
}

/// The permission of a peer's datagram (the allocation is the relayed address it went to).
#[inline(always)]
fn lookup_permission(udp: &UdpDatagram) -> Found<Permission> {
    let (peer_ip, relayed_ip) = udp.addresses();
    let key = permission_key(
        relayed_ip,
        peer_ip,
        u16::from_ne_bytes(udp.udp.dst_port),
        udp.family(),
    );
    lookup(&PERMISSIONS, &key)
}

/// The allocation of a client's Send indication.
#[inline(always)]
fn lookup_client(udp: &UdpDatagram) -> Found<ToRelay> {
    lookup(&CLIENTS, &udp.client_key())
}

/// Checks an entry's flags and deadline.
#[inline(always)]
pub fn usable(flags: u16, expires_at_ns: u64) -> Result<(), Reason> {
    if flags & FLAG_ENABLED == 0 {
        return Err(Reason::PassDisabled);
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= expires_at_ns {
        return Err(Reason::PassExpired);
    }
    Ok(())
}

/// Strips the ChannelData header (and padding), sends the data from the relayed address to
/// the peer.
// Not inlined: one BPF subprogram per direction keeps each stack frame small.
#[inline(never)]
fn to_peer<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    message: &ChannelData,
    entry: &ToPeer,
) -> Result<Forward, Reason> {
    usable(entry.flags, entry.expires_at_ns)?;
    let out_v6 = other_family(udp, entry.flags);
    // Defence in depth: XDP and TC bypass netfilter, so the program applies the peer policy
    // itself, whatever userspace installed.
    if !peer_allowed_cached(family_of(out_v6), &entry.peer_ip, entry.next_hop) {
        return Err(Reason::PassPolicyDenied);
    }
    let hop = next_hop(entry.next_hop).ok_or(Reason::PassNoNextHop)?;
    let frame_len = ctx.data_end() - ctx.data();
    let data_end = udp.payload_offset + CHANNEL_DATA_HEADER_LEN + message.data_len;

    // The header leaves the UDP data; so do the padding bytes, whose values we must know.
    let mut data = Delta::new();
    data.remove(message.channel);
    data.remove(word(message.data_len as u16));
    remove_padding(ctx, udp, message, &mut data)?;

    let plan = Plan {
        src_ip: &entry.relayed_ip,
        dst_ip: &entry.peer_ip,
        src_port: entry.relayed_port,
        dst_port: entry.peer_port,
        new_udp_len: UDP_HDR_LEN + message.data_len,
        data,
        trim: frame_len - data_end,
        grow: 0,
        resize: Resize::Strip(CHANNEL_DATA_HEADER_LEN as u32),
        out_v6,
    };
    let egress = rewrite(ctx, udp, &plan, hop)?;
    count_allocation(entry.counters, true, message.data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardToPeer,
        egress,
    })
}

/// The channel back of a hairpin entry: the other allocation sees this allocation's relayed
/// address as its peer (both relayed addresses are of one family, the relay's, IPv6 when
/// `relayed_v6`). A subprogram of its own, called from the entry point: its key and the digest
/// check stack on neither the entry point's frame nor [`hairpin`]'s.
#[inline(never)]
fn hairpin_target(entry: &ToPeer, relayed_v6: bool) -> Result<&'static ToClient, Reason> {
    let key = peer_key(
        entry.relayed_ip,
        entry.peer_ip,
        entry.relayed_port,
        entry.peer_port,
        family_of(relayed_v6),
    );
    lookup(&PEERS, &key)?.ok_or(Reason::PassHairpinNoChannel)
}

/// Client-to-client through this relay: the peer of `entry` is another allocation's relayed
/// address. When that allocation has a channel for this allocation's relayed address, the
/// ChannelData goes straight to its client with that channel number, exactly what the socket
/// path would produce after a trip through both relay sockets; otherwise the socket path
/// delivers it (as a Data indication).
#[inline(never)]
fn hairpin<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    message: &ChannelData,
    entry: &ToPeer,
    target: &ToClient,
) -> Result<Forward, Reason> {
    usable(entry.flags, entry.expires_at_ns)?;
    let relayed_v6 = other_family(udp, entry.flags);
    usable(target.flags, target.expires_at_ns)?;
    let out_v6 = relayed_v6 != (target.flags & FLAG_TRANSLATE != 0);
    let hop = next_hop(target.next_hop).ok_or(Reason::PassNoNextHop)?;
    let frame_len = ctx.data_end() - ctx.data();
    let data_end = udp.payload_offset + CHANNEL_DATA_HEADER_LEN + message.data_len;

    // Same length, the receiving allocation's channel number, no padding (optional over UDP).
    let mut data = Delta::new();
    data.replace(message.channel, target.channel);
    remove_padding(ctx, udp, message, &mut data)?;
    let plan = Plan {
        src_ip: &target.listener_ip,
        dst_ip: &target.client_ip,
        src_port: target.listener_port,
        dst_port: target.client_port,
        new_udp_len: UDP_HDR_LEN + CHANNEL_DATA_HEADER_LEN + message.data_len,
        data,
        trim: frame_len - data_end,
        grow: 0,
        resize: Resize::Keep,
        out_v6,
    };
    let egress = rewrite(ctx, udp, &plan, hop)?;
    write_channel_header(
        ctx,
        payload_offset(out_v6),
        target.channel,
        message.data_len,
    )?;
    count_allocation(entry.counters, true, message.data_len as u64);
    count_allocation(target.counters, false, message.data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardHairpin,
        egress,
    })
}

/// Prepends a ChannelData header, sends the datagram from the listener to the client.
#[inline(never)]
fn to_client<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    entry: &ToClient,
) -> Result<Forward, Reason> {
    usable(entry.flags, entry.expires_at_ns)?;
    let out_v6 = other_family(udp, entry.flags);
    let hop = next_hop(entry.next_hop).ok_or(Reason::PassNoNextHop)?;
    let frame_len = ctx.data_end() - ctx.data();
    let data_len = udp.payload_len;
    let new_udp_len = UDP_HDR_LEN + CHANNEL_DATA_HEADER_LEN + data_len;
    if new_udp_len > 0xffff {
        return Err(Reason::PassFragNeeded);
    }
    // No padding over UDP (RFC 8656 §12.5 makes it optional there).
    let mut data = Delta::new();
    data.add(entry.channel);
    data.add(word(data_len as u16));
    let plan = Plan {
        src_ip: &entry.listener_ip,
        dst_ip: &entry.client_ip,
        src_port: entry.listener_port,
        dst_port: entry.client_port,
        new_udp_len,
        data,
        trim: frame_len - (udp.payload_offset + data_len),
        grow: 0,
        resize: Resize::Insert(CHANNEL_DATA_HEADER_LEN as u32),
        out_v6,
    };
    let egress = rewrite(ctx, udp, &plan, hop)?;
    write_channel_header(ctx, payload_offset(out_v6), entry.channel, data_len)?;
    count_allocation(entry.counters, false, data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardToClient,
        egress,
    })
}

/// Accounts for the padding bytes after a ChannelData message leaving the UDP data.
#[inline(always)]
fn remove_padding<C: Packet>(
    ctx: &C,
    udp: &UdpDatagram,
    message: &ChannelData,
    data: &mut Delta,
) -> Result<(), Reason> {
    if message.padding == 0 {
        return Ok(());
    }
    // The last four bytes of the UDP payload end with the padding; offsets inside the UDP
    // datagram decide which half of its checksum word a byte is.
    let mut tail = [0u8; 4];
    let tail_offset = udp.payload_offset + udp.payload_len - 4;
    if !ctx.load4(tail_offset, &mut tail) {
        return Err(Reason::PassMalformedUdp);
    }
    let first_pad = 4 - message.padding;
    for (i, byte) in tail.iter().enumerate() {
        if i >= first_pad {
            let udp_offset = UDP_HDR_LEN + udp.payload_len - 4 + i;
            data.remove_byte(*byte, udp_offset.is_multiple_of(2));
        }
    }
    Ok(())
}

/// Writes a ChannelData header at `payload_offset`, the start of the rewritten UDP payload.
#[inline(always)]
fn write_channel_header<C: Packet>(
    ctx: &C,
    payload_offset: usize,
    channel: u16,
    data_len: usize,
) -> Result<(), Reason> {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let slot = frame
        .ptr_at::<[u16; 2]>(payload_offset)
        .ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the four bytes lie inside the (reloaded) frame.
    unsafe { slot.write_unaligned([channel, word(data_len as u16)]) };
    Ok(())
}

/// Whether the datagram leaves as IPv6: the family it came in with, or the other one when the
/// entry relays between families ([`FLAG_TRANSLATE`]).
#[inline(always)]
fn other_family(udp: &UdpDatagram, flags: u16) -> bool {
    matches!(udp.ip, IpHeader::V6(_)) != (flags & FLAG_TRANSLATE != 0)
}

/// `FAMILY_IPV6` or `FAMILY_IPV4`.
#[inline(always)]
pub fn family_of(v6: bool) -> u8 {
    if v6 {
        FAMILY_IPV6
    } else {
        FAMILY_IPV4
    }
}

/// Offset of the UDP payload in a frame of that family (no IP options or extension headers).
#[inline(always)]
pub fn payload_offset(v6: bool) -> usize {
    ETH_HDR_LEN + if v6 { IPV6_HDR_LEN } else { IPV4_HDR_LEN } + UDP_HDR_LEN
}

/// How the frame's length changes right after the UDP header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Remove this many bytes: a ChannelData header (client → peer), a Send indication's
    /// framing.
    Strip(u32),
    /// Insert this many bytes: a ChannelData header (peer → client), a Data indication's
    /// framing.
    Insert(u32),
    /// Keep the ChannelData header where it is (hairpin).
    Keep,
}

/// The new addressing of one datagram and how its data changes. Fields are network-order
/// words, like the map values they come from.
pub struct Plan<'a> {
    /// Addresses stay in the map value; copying them would cost stack the program lacks.
    pub src_ip: &'a [u32; 4],
    pub dst_ip: &'a [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// UDP length after the rewrite.
    pub new_udp_len: usize,
    /// Checksum change of the UDP data (ChannelData header and padding in or out).
    pub data: Delta,
    /// Bytes to cut at the end: padding and any link-layer trailer.
    pub trim: usize,
    /// Zero bytes to append after trimming (a Data indication's attribute padding).
    pub grow: usize,
    pub resize: Resize,
    /// The family of the datagram sent: the received one's, or the other one when the
    /// binding relays between IPv4 and IPv6.
    pub out_v6: bool,
}

/// Checks the next hop, then rewrites Ethernet, IP and UDP headers. Returns the egress ifindex.
#[inline(always)]
pub fn rewrite<C: Packet>(
    ctx: &mut C,
    udp: &UdpDatagram,
    plan: &Plan,
    hop: &NextHop,
) -> Result<u32, Reason> {
    let ingress = ctx.ingress_ifindex();
    let old_udp_len = word((UDP_HDR_LEN + udp.payload_len) as u16);
    let new_udp_len = word(plan.new_udp_len as u16);
    let old_check = u16::from_ne_bytes(udp.udp.check);
    let in_v6 = matches!(udp.ip, IpHeader::V6(_));
    let v6 = plan.out_v6;
    // RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6, and one that was never
    // computed cannot be updated for it; let the stack decide.
    if (in_v6 || v6) && old_check == 0 {
        return Err(Reason::PassIpv6ZeroChecksum);
    }

    if hop.flags & NEXT_HOP_VALID == 0 {
        return Err(Reason::PassNoNextHop);
    }
    let ip_len = if v6 { IPV6_HDR_LEN } else { IPV4_HDR_LEN } + plan.new_udp_len;
    if ip_len > hop.mtu as usize {
        return Err(Reason::PassFragNeeded);
    }
    let egress = hop.ifindex;
    if egress != ingress && !ctx.select_egress(egress) {
        return Err(Reason::PassEgressNotAttached);
    }

    // UDP checksum: pseudo-header addresses and length, ports, length field, data.
    let mut l4 = plan.data;
    l4.replace(u16::from_ne_bytes(udp.udp.src_port), plan.src_port);
    l4.replace(u16::from_ne_bytes(udp.udp.dst_port), plan.dst_port);
    // The length appears twice: in the pseudo-header and in the UDP header.
    l4.replace(old_udp_len, new_udp_len);
    l4.replace(old_udp_len, new_udp_len);
    let (old_src, old_dst) = udp.addresses();
    if in_v6 != v6 {
        // IPv4 ↔ IPv6: the pseudo-header's protocol and length words sum the same in both
        // families (RFC 768, RFC 8200 §8.1); only the addresses change size.
        l4.remove_address(&old_src, in_v6);
        l4.remove_address(&old_dst, in_v6);
        l4.add_address(plan.src_ip, v6);
        l4.add_address(plan.dst_ip, v6);
    } else if v6 {
        l4.replace128(&old_src, plan.src_ip);
        l4.replace128(&old_dst, plan.dst_ip);
    } else {
        l4.replace32(old_src[0], plan.src_ip[0]);
        l4.replace32(old_dst[0], plan.dst_ip[0]);
    }
    // A zero IPv4 checksum ("none", RFC 768) stays zero.
    let check = if old_check == 0 {
        0
    } else {
        l4.apply_udp(old_check)
    };

    // From here on the frame changes. A step that fails before anything changed leaves the
    // frame as it came (pass it); one that fails after leaves it half rewritten (drop it).
    // The resize comes before the family change: on TC `bpf_skb_adjust_room` refuses to grow
    // past the ingress MTU while `bpf_skb_change_proto` does not check, so a datagram too
    // large for the translated frame fails while it is still intact.
    let failed = |changed: bool| {
        if changed {
            Reason::DropRewriteFailed
        } else {
            Reason::PassAdjustFailed
        }
    };
    if plan.trim > 0 && !ctx.trim_tail(plan.trim) {
        return Err(failed(false));
    }
    if plan.grow > 0 && !ctx.grow_tail(plan.grow) {
        return Err(failed(plan.trim > 0));
    }
    let moved = match plan.resize {
        Resize::Strip(len) => ctx.strip(len),
        Resize::Insert(len) => ctx.insert(len),
        Resize::Keep => true,
    };
    if !moved {
        return Err(failed(plan.trim > 0 || plan.grow > 0));
    }
    if in_v6 != v6 && !ctx.change_family(v6) {
        return Err(failed(
            plan.trim > 0 || plan.grow > 0 || plan.resize != Resize::Keep,
        ));
    }

    // Reload: the helpers above invalidated every packet pointer, and every header byte is
    // written anew: all their fields are known, so nothing had to be moved.
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let eth = frame.ptr_at::<EthHdr>(0).ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the header lies inside the reloaded frame; `hop` is a map value.
    unsafe {
        copy_bytes::<6>((*eth).dst.as_mut_ptr(), hop.dmac.as_ptr());
        copy_bytes::<6>((*eth).src.as_mut_ptr(), hop.smac.as_ptr());
        (*eth).ether_type = if v6 { ETH_P_IPV6 } else { ETH_P_IPV4 }.to_be_bytes();
    }
    let l4_offset = if v6 {
        let ip = frame
            .ptr_at::<Ipv6Hdr>(ETH_HDR_LEN)
            .ok_or(Reason::DropRewriteFailed)?;
        // SAFETY: as above.
        unsafe {
            (*ip).version_class_flow = IPV6_FIRST_WORD;
            (*ip).payload_len = new_udp_len.to_ne_bytes();
            (*ip).next_header = IPPROTO_UDP;
            (*ip).hop_limit = FORWARD_TTL;
            (*ip).src = ip_octets(*plan.src_ip);
            (*ip).dst = ip_octets(*plan.dst_ip);
        }
        ETH_HDR_LEN + IPV6_HDR_LEN
    } else {
        let ip = frame
            .ptr_at::<Ipv4Hdr>(ETH_HDR_LEN)
            .ok_or(Reason::DropRewriteFailed)?;
        // SAFETY: as above.
        unsafe { write_ipv4(&mut *ip, plan) };
        ETH_HDR_LEN + IPV4_HDR_LEN
    };
    let slot = frame
        .ptr_at::<[u16; 4]>(l4_offset)
        .ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: as above; the UDP header is four network-order words.
    unsafe { slot.write_unaligned([plan.src_port, plan.dst_port, new_udp_len, check]) };
    ctx.checksums_rewritten();
    Ok(egress)
}

/// Writes a whole IPv4 header (no options) with the relay's fields and a fresh checksum.
#[inline(always)]
fn write_ipv4(ip: &mut Ipv4Hdr, plan: &Plan) {
    let total_len = word((IPV4_HDR_LEN + plan.new_udp_len) as u16);
    ip.version_ihl = 0x45;
    ip.tos = 0;
    ip.total_len = total_len.to_ne_bytes();
    ip.id = [0, 0];
    ip.frag_off = word(IPV4_DONT_FRAGMENT).to_ne_bytes();
    ip.ttl = FORWARD_TTL;
    ip.protocol = IPPROTO_UDP;
    ip.check =
        ipv4_header_checksum(total_len, FORWARD_TTL, plan.src_ip[0], plan.dst_ip[0]).to_ne_bytes();
    ip.src = plan.src_ip[0].to_ne_bytes();
    ip.dst = plan.dst_ip[0].to_ne_bytes();
}

/// Copies `N` bytes one by one. Volatile keeps LLVM from turning the copy into a `memcpy` /
/// `memmove` call: the BPF target implements those as a byte loop in a subprogram, several
/// times the instructions of the unrolled copy.
///
/// # Safety
/// `src` must be readable and `dst` writable for `N` bytes; the ranges must not overlap.
#[inline(always)]
unsafe fn copy_bytes<const N: usize>(dst: *mut u8, src: *const u8) {
    let mut i = 0;
    while i < N {
        // SAFETY: `i < N`, and the caller vouches for `N` bytes at both ends.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}
