//! Classification of one UDP datagram and the rewrite shared by both directions.
//!
//! Order of work, chosen so that nothing is modified until forwarding is certain:
//! parse → map lookup → expiry → `bpf_fib_lookup` → egress check → compute new headers and
//! checksums → shrink/grow the frame → reload pointers, bounds-check, write headers.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::bpf_fib_lookup, helpers::bpf_ktime_get_ns};
use relay_common::{ip_octets, Reason, ToClient, ToPeer, CHANNEL_DATA_HEADER_LEN, FLAG_ENABLED};

use crate::{
    channel::{self, ChannelData, Classified},
    checksum::{word, Delta},
    context::Packet,
    headers::{
        EthHdr, Frame, IpHeader, Ipv4Hdr, Ipv6Hdr, UdpDatagram, ETH_HDR_LEN, IPPROTO_UDP,
        IPV4_HDR_LEN, IPV6_HDR_LEN, UDP_HDR_LEN,
    },
    maps::{count_allocation, CHANNELS, LISTENER_PORTS, PEERS},
};

/// TTL / hop limit of forwarded datagrams: the relay originates them, as its sockets would.
const TTL: u8 = 64;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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
    let classified = match frame.ptr_at::<[u8; 4]>(udp.payload_offset) {
        // SAFETY: `ptr_at` checked that four bytes lie inside the frame.
        Some(header) => channel::classify(unsafe { *header }, udp.payload_len),
        None => Classified::NotChannelData,
    };
    let to_listener = !matches!(classified, Classified::NotChannelData)
        && LISTENER_PORTS
            .get_ptr(u16::from_ne_bytes(udp.udp.dst_port))
            .is_some();
    if to_listener {
        match classified {
            Classified::NotChannelData => {}
            Classified::Bad(reason) => miss = reason,
            Classified::ChannelData(message) => {
                let key = udp.channel_key(message.channel);
                if let Some(entry) = CHANNELS.get_ptr(key) {
                    // SAFETY: a successful lookup returns a valid, aligned value pointer; the
                    // element stays allocated (preallocated map) while the program runs.
                    return to_peer(ctx, &udp, &message, unsafe { &*entry });
                }
                miss = Reason::PassNoBinding;
            }
        }
    }

    // Peer → client: a datagram to a relayed address from a peer with a bound channel
    // (RFC 8656 §12.6).
    let key = udp.peer_key();
    if let Some(entry) = PEERS.get_ptr(key) {
        // SAFETY: as above.
        return to_client(ctx, &udp, unsafe { &*entry });
    }
    Err(miss)
}

/// Checks an entry's flags and deadline.
#[inline(always)]
fn usable(flags: u32, expires_at_ns: u64) -> Result<(), Reason> {
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
    let frame_len = ctx.data_end() - ctx.data();
    let data_end = udp.payload_offset + CHANNEL_DATA_HEADER_LEN + message.data_len;

    // The header leaves the UDP data; so do the padding bytes, whose values we must know.
    let mut data = Delta::new();
    data.remove(message.channel);
    data.remove(word(message.data_len as u16));
    if message.padding > 0 {
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
    }

    let plan = Plan {
        src_ip: &entry.relayed_ip,
        dst_ip: &entry.peer_ip,
        src_port: entry.relayed_port,
        dst_port: entry.peer_port,
        new_udp_len: UDP_HDR_LEN + message.data_len,
        data,
        trim: frame_len - data_end,
        strip_header: true,
    };
    let egress = rewrite(ctx, udp, &plan)?;
    count_allocation(entry.allocation, true, message.data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardToPeer,
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
    usable(entry.flags as u32, entry.expires_at_ns)?;
    let frame_len = ctx.data_end() - ctx.data();
    let data_len = udp.payload_len;
    let new_udp_len = UDP_HDR_LEN + CHANNEL_DATA_HEADER_LEN + data_len;
    if new_udp_len > 0xffff {
        return Err(Reason::PassFibFragNeeded);
    }
    // No padding over UDP (RFC 8656 §12.5 makes it optional there).
    let length = word(data_len as u16);
    let mut data = Delta::new();
    data.add(entry.channel);
    data.add(length);
    let plan = Plan {
        src_ip: &entry.listener_ip,
        dst_ip: &entry.client_ip,
        src_port: entry.listener_port,
        dst_port: entry.client_port,
        new_udp_len,
        data,
        trim: frame_len - (udp.payload_offset + data_len),
        strip_header: false,
    };
    let egress = rewrite(ctx, udp, &plan)?;
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let slot = frame
        .ptr_at::<[u16; 2]>(udp.payload_offset)
        .ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the four bytes lie inside the (reloaded) frame.
    unsafe { slot.write_unaligned([entry.channel, length]) };
    count_allocation(entry.allocation, false, data_len as u64);
    Ok(Forward {
        reason: Reason::ForwardToClient,
        egress,
    })
}

/// The new addressing of one datagram and how its data changes. Fields are network-order
/// words, like the map values they come from.
struct Plan<'a> {
    /// Addresses stay in the map value; copying them would cost stack the program lacks.
    src_ip: &'a [u32; 4],
    dst_ip: &'a [u32; 4],
    src_port: u16,
    dst_port: u16,
    /// UDP length after the rewrite.
    new_udp_len: usize,
    /// Checksum change of the UDP data (ChannelData header and padding in or out).
    data: Delta,
    /// Bytes to cut at the end: padding and any link-layer trailer.
    trim: usize,
    /// Remove four bytes after the UDP header (client → peer) rather than insert them.
    strip_header: bool,
}

/// Finds the next hop, then rewrites Ethernet, IP and UDP headers. Returns the egress ifindex.
#[inline(always)]
fn rewrite<C: Packet>(ctx: &mut C, udp: &UdpDatagram, plan: &Plan) -> Result<u32, Reason> {
    let ingress = ctx.ingress_ifindex();
    let old_udp_len = word((UDP_HDR_LEN + udp.payload_len) as u16);
    let new_udp_len = word(plan.new_udp_len as u16);
    let old_check = u16::from_ne_bytes(udp.udp.check);
    let v6 = matches!(udp.ip, IpHeader::V6(_));
    // RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6; let the stack decide.
    if v6 && old_check == 0 {
        return Err(Reason::PassIpv6ZeroChecksum);
    }

    let mut room = FibRoom(MaybeUninit::uninit());
    let fib = fib_params(&mut room, ingress, plan, v6);
    let egress = next_hop(ctx, fib)?;
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
    if v6 {
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

    // From here on the frame changes. Trim first: if that fails nothing has changed yet.
    if plan.trim > 0 && !ctx.trim_tail(plan.trim) {
        return Err(Reason::PassAdjustFailed);
    }
    let moved = if plan.strip_header {
        ctx.strip4(udp.l4_offset)
    } else {
        ctx.insert4(udp.l4_offset)
    };
    if !moved {
        return Err(if plan.trim > 0 {
            Reason::DropRewriteFailed
        } else {
            Reason::PassAdjustFailed
        });
    }

    // Reload: the helpers above invalidated every packet pointer. Ethernet and IP headers kept
    // their content; the UDP header slot is garbage until written.
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let eth = frame.ptr_at::<EthHdr>(0).ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the header lies inside the reloaded frame; `fib` is ours.
    unsafe {
        copy_bytes::<6>((*eth).dst.as_mut_ptr(), fib.dmac.as_ptr());
        copy_bytes::<6>((*eth).src.as_mut_ptr(), fib.smac.as_ptr());
    }
    let l4_offset = if v6 {
        let ip = frame
            .ptr_at::<Ipv6Hdr>(ETH_HDR_LEN)
            .ok_or(Reason::DropRewriteFailed)?;
        // SAFETY: as above.
        unsafe {
            (*ip).payload_len = new_udp_len.to_ne_bytes();
            (*ip).hop_limit = TTL;
            (*ip).src = ip_octets(*plan.src_ip);
            (*ip).dst = ip_octets(*plan.dst_ip);
        }
        ETH_HDR_LEN + IPV6_HDR_LEN
    } else {
        let ip = frame
            .ptr_at::<Ipv4Hdr>(ETH_HDR_LEN)
            .ok_or(Reason::DropRewriteFailed)?;
        // SAFETY: as above.
        unsafe { rewrite_ipv4(&mut *ip, plan) };
        ETH_HDR_LEN + IPV4_HDR_LEN
    };
    let slot = frame
        .ptr_at::<[u16; 4]>(l4_offset)
        .ok_or(Reason::DropRewriteFailed)?;
    // SAFETY: as above; the UDP header is four network-order words.
    unsafe { slot.write_unaligned([plan.src_port, plan.dst_port, new_udp_len, check]) };
    Ok(egress)
}

/// Rewrites an IPv4 header in place and updates its checksum incrementally.
#[inline(always)]
fn rewrite_ipv4(ip: &mut Ipv4Hdr, plan: &Plan) {
    let total_len = word((IPV4_HDR_LEN + plan.new_udp_len) as u16);
    let mut delta = Delta::new();
    delta.replace32(u32::from_ne_bytes(ip.src), plan.src_ip[0]);
    delta.replace32(u32::from_ne_bytes(ip.dst), plan.dst_ip[0]);
    delta.replace(u16::from_ne_bytes(ip.total_len), total_len);
    delta.replace(
        u16::from_ne_bytes([ip.ttl, ip.protocol]),
        u16::from_ne_bytes([TTL, ip.protocol]),
    );
    ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
    ip.src = plan.src_ip[0].to_ne_bytes();
    ip.dst = plan.dst_ip[0].to_ne_bytes();
    ip.total_len = total_len.to_ne_bytes();
    ip.ttl = TTL;
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

/// Stack room for the `bpf_fib_lookup` arguments, 8-byte aligned so that [`fib_params`] can
/// zero it a word at a time.
#[repr(C, align(8))]
struct FibRoom(MaybeUninit<bpf_fib_lookup>);

const FIB_WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 8;
const _: () = assert!(FIB_WORDS * 8 == core::mem::size_of::<bpf_fib_lookup>());

/// Fills `room` with the `bpf_fib_lookup` arguments for the rewritten datagram.
#[inline(always)]
fn fib_params<'a>(
    room: &'a mut FibRoom,
    ingress: u32,
    plan: &Plan,
    v6: bool,
) -> &'a mut bpf_fib_lookup {
    // All-zero is a valid `bpf_fib_lookup` (plain integers and unions of integers) and is what
    // the helper expects in the fields we do not set. Eight word stores, volatile so that LLVM
    // does not fuse them into a `memset` call: the BPF target implements that as a byte loop
    // in a subprogram, over 200 instructions for these 64 bytes.
    let words = room.0.as_mut_ptr().cast::<u64>();
    for i in 0..FIB_WORDS {
        // SAFETY: `i < FIB_WORDS` keeps the store inside `room`, which `repr(align(8))`
        // aligns for u64 stores.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was just zeroed, which is a valid `bpf_fib_lookup`.
    let fib = unsafe { room.0.assume_init_mut() };
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = plan.src_port;
    fib.dport = plan.dst_port;
    fib.ifindex = ingress;
    // Network-order words, as the kernel's __be32 fields expect; for IPv4 the first word
    // overlays `ipv4_src`/`ipv4_dst`.
    fib.__bindgen_anon_3.ipv6_src = *plan.src_ip;
    fib.__bindgen_anon_4.ipv6_dst = *plan.dst_ip;
    if v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_1.tot_len = (IPV6_HDR_LEN + plan.new_udp_len) as u16;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = (IPV4_HDR_LEN + plan.new_udp_len) as u16;
    }
    fib
}

/// Runs the FIB lookup and maps its result to an egress ifindex or a pass reason.
#[inline(always)]
fn next_hop<C: Packet>(ctx: &C, fib: &mut bpf_fib_lookup) -> Result<u32, Reason> {
    // Return codes from include/uapi/linux/bpf.h (BPF_FIB_LKUP_RET_*).
    match ctx.fib_lookup(fib) {
        0 => Ok(fib.ifindex),
        1..=4 => Err(Reason::PassFibNoRoute),
        5 => Err(Reason::PassFibForwardingDisabled),
        7 => Err(Reason::PassFibNoNeighbour),
        8 => Err(Reason::PassFibFragNeeded),
        _ => Err(Reason::PassFibError),
    }
}
