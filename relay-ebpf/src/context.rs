//! What the forwarding logic needs from a program context, for XDP and for TC.
//!
//! Both directions are written once against [`Packet`]; the entry points wrap their context
//! and turn the outcome into their own action codes.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_NET, xdp_md, BPF_CSUM_LEVEL_RESET},
    helpers::generated::{
        bpf_csum_level, bpf_skb_adjust_room, bpf_skb_change_proto, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
};

use crate::maps::EGRESS_DEVICES;

/// The frame under the program and the helpers that change it.
pub trait Packet {
    /// Address of the first byte (Ethernet header).
    fn data(&self) -> usize;
    /// Address one past the last byte.
    fn data_end(&self) -> usize;
    /// Interface the frame arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Removes `len` bytes right after the UDP header (a ChannelData header, a Send
    /// indication's framing): everything behind them keeps its place relative to the end of
    /// the headers, and every header byte (Ethernet, IP, UDP) is garbage afterwards: the caller
    /// writes all of them anew. Data pointers must be reloaded afterwards.
    fn strip(&mut self, len: u32) -> bool;
    /// Inserts `len` bytes right after the UDP header, with the same guarantees as
    /// [`Packet::strip`]: afterwards every header byte and the new ones are garbage.
    fn insert(&mut self, len: u32) -> bool;
    /// Makes room for an IP header of the other family (IPv4 → IPv6 when `to_v6`, 20 bytes
    /// more, or back): afterwards every header byte is garbage, the payload keeps its bytes.
    /// Done after [`Packet::strip`] / [`Packet::insert`], which adjust room after the current
    /// family's header.
    fn change_family(&mut self, to_v6: bool) -> bool;
    /// Removes `len` bytes at the end. Data pointers must be reloaded afterwards.
    fn trim_tail(&mut self, len: usize) -> bool;
    /// Appends `len` zero bytes at the end. Data pointers must be reloaded afterwards.
    fn grow_tail(&mut self, len: usize) -> bool;
    /// Copies `N` bytes at `offset` (checked by the helper, not the verifier) into `buf`.
    fn load<const N: usize>(&self, offset: usize, buf: &mut [u8; N]) -> bool;
    /// Copies four bytes at `offset` into `buf`.
    #[inline(always)]
    fn load4(&self, offset: usize, buf: &mut [u8; 4]) -> bool {
        self.load(offset, buf)
    }
    /// Tells the kernel that the checksums in the frame were rewritten by the program, so any
    /// checksum state the device left on it (CHECKSUM_COMPLETE) no longer holds. XDP frames
    /// carry none.
    fn checksums_rewritten(&mut self);
    /// Whether the program may send the frame out of `ifindex`, another interface than the
    /// one it arrived on: only interfaces in `EGRESS_DEVICES` qualify. XDP also makes
    /// `ifindex` the redirect target right away (`bpf_redirect_map` only records it; the
    /// frame leaves when the program returns XDP_REDIRECT), so one map lookup serves both; if
    /// the frame is passed or dropped after all, the kernel ignores the recorded target.
    /// Changes nothing in the frame.
    fn select_egress(&mut self, ifindex: u32) -> bool;
}

/// Largest frame offset [`Xdp::load`] reads at: far beyond any single-buffer XDP frame.
const MAX_DIRECT_OFFSET: usize = 0x7fff;

/// An XDP context.
pub struct Xdp {
    pub ctx: *mut xdp_md,
}

impl Packet for Xdp {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the kernel hands the program a valid `xdp_md`.
        unsafe { (*self.ctx).data as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.ctx).data_end as usize }
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn strip(&mut self, len: u32) -> bool {
        // The first `len` bytes leave; the headers that now start the frame are rewritten
        // whole by the caller, so nothing has to move.
        // SAFETY: the helper checks the new head against the frame itself.
        unsafe { bpf_xdp_adjust_head(self.ctx, len as i32) == 0 }
    }

    #[inline(always)]
    fn insert(&mut self, len: u32) -> bool {
        // `len` bytes of headroom join the frame; the caller rewrites the headers whole.
        // SAFETY: the helper checks there is enough headroom.
        unsafe { bpf_xdp_adjust_head(self.ctx, -(len as i32)) == 0 }
    }

    #[inline(always)]
    fn change_family(&mut self, to_v6: bool) -> bool {
        // 20 more (or fewer) bytes in front: the headers are rewritten whole anyway.
        let delta: i32 = if to_v6 { -20 } else { 20 };
        // SAFETY: the helper checks the new head against the frame (and the headroom).
        unsafe { bpf_xdp_adjust_head(self.ctx, delta) == 0 }
    }

    #[inline(always)]
    fn trim_tail(&mut self, len: usize) -> bool {
        // SAFETY: the helper refuses to shrink below an Ethernet header.
        unsafe { bpf_xdp_adjust_tail(self.ctx, -(len as i32)) == 0 }
    }

    #[inline(always)]
    fn grow_tail(&mut self, len: usize) -> bool {
        // SAFETY: the helper checks the tailroom and zeroes what it adds.
        unsafe { bpf_xdp_adjust_tail(self.ctx, len as i32) == 0 }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize, buf: &mut [u8; N]) -> bool {
        // Direct packet access, a few instructions instead of a helper call: the program is
        // not loaded for multi-buffer frames (no BPF_F_XDP_HAS_FRAGS), so the whole frame is
        // linear between `data` and `data_end`, at most a page. The offset bound lets the
        // verifier mark the checked range: it does so only while offset plus access stay
        // within 64 KiB.
        if offset > MAX_DIRECT_OFFSET {
            return false;
        }
        // Opaque to LLVM, so the bounds check below is made on this very pointer: with a
        // variable offset LLVM would otherwise compare `offset + N` computed apart from the
        // pointer it reads through, which the verifier cannot relate.
        let at = core::hint::black_box(self.data() + offset);
        if at + N > self.data_end() {
            return false;
        }
        // SAFETY: the `N` bytes at `at` lie inside the frame (checked just above).
        *buf = unsafe { (at as *const [u8; N]).read_unaligned() };
        true
    }

    #[inline(always)]
    fn checksums_rewritten(&mut self) {}

    #[inline(always)]
    fn select_egress(&mut self, ifindex: u32) -> bool {
        // Flags 0: a missing entry answers XDP_ABORTED (as `Err`) and records no target.
        EGRESS_DEVICES.redirect(ifindex, 0).is_ok()
    }
}

/// A TC (clsact) context.
pub struct Tc {
    pub skb: *mut __sk_buff,
}

impl Packet for Tc {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the kernel hands the program a valid `__sk_buff`.
        unsafe { (*self.skb).data as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.skb).data_end as usize }
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn strip(&mut self, len: u32) -> bool {
        // BPF_ADJ_ROOM_NET removes `len` bytes right after the IP header (the old UDP header
        // and what follows it; the caller rewrites every header whole). It also resets the
        // skb's checksum state to CHECKSUM_NONE, which is right: our checksums are complete.
        // SAFETY: the helper validates the skb and the length itself.
        unsafe { bpf_skb_adjust_room(self.skb, -(len as i32), BPF_ADJ_ROOM_NET, 0) == 0 }
    }

    #[inline(always)]
    fn insert(&mut self, len: u32) -> bool {
        // Inserts `len` bytes between IP and UDP header; the caller rewrites UDP and what it
        // puts in front of the payload.
        // SAFETY: as above.
        unsafe { bpf_skb_adjust_room(self.skb, len as i32, BPF_ADJ_ROOM_NET, 0) == 0 }
    }

    #[inline(always)]
    fn change_family(&mut self, to_v6: bool) -> bool {
        // The NAT64 helper: grows or shrinks the room for the L3 header by 20 bytes and sets
        // skb->protocol, so the skb is an IPv6 (or IPv4) one on its way out.
        let proto: u16 = if to_v6 { 0x86dd } else { 0x0800 };
        // SAFETY: the skb pointer is valid; the helper checks the skb itself.
        unsafe { bpf_skb_change_proto(self.skb, proto.to_be(), 0) == 0 }
    }

    #[inline(always)]
    fn grow_tail(&mut self, len: usize) -> bool {
        // SAFETY: the skb pointer is valid; the helper checks the new length and zero-fills.
        unsafe {
            let new_len = (*self.skb).len + len as u32;
            bpf_skb_change_tail(self.skb, new_len, 0) == 0
        }
    }

    #[inline(always)]
    fn trim_tail(&mut self, len: usize) -> bool {
        // SAFETY: the skb pointer is valid; the helper checks the new length.
        unsafe {
            let new_len = (*self.skb).len - len as u32;
            bpf_skb_change_tail(self.skb, new_len, 0) == 0
        }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize, buf: &mut [u8; N]) -> bool {
        // SAFETY: the helper bounds-checks against the skb and writes exactly `N` bytes.
        unsafe {
            bpf_skb_load_bytes(
                self.skb.cast::<c_void>(),
                offset as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            ) == 0
        }
    }

    #[inline(always)]
    fn checksums_rewritten(&mut self) {
        // SAFETY: the skb pointer is valid; the helper only changes its checksum state. It
        // cannot fail for BPF_CSUM_LEVEL_RESET.
        unsafe { bpf_csum_level(self.skb, u64::from(BPF_CSUM_LEVEL_RESET)) };
    }

    #[inline(always)]
    fn select_egress(&mut self, ifindex: u32) -> bool {
        // TC cannot use bpf_redirect_map; the entry point redirects with bpf_redirect.
        EGRESS_DEVICES.get_ifindex(ifindex).is_some()
    }
}
