//! Incremental Internet checksum updates (RFC 1071 arithmetic, RFC 1624 eqn. 3).
//!
//! The fast path never sums a whole payload: it collects what leaves and what enters the
//! checksummed bytes into a [`Delta`] and applies it to the checksum already in the packet.
//! Pure `no_std` code without loops over packet data, unit-tested on the host against full
//! recomputation.

/// One's-complement sum of 16-bit words removed from and added to checksummed data.
///
/// Words are *native* reads of packet-order bytes (`u16::from_ne_bytes`), as are the checksum
/// field passed to [`Delta::apply`] and its result: the Internet checksum is byte-order
/// independent (RFC 1071 §2(B)), so no byte swapping is needed anywhere. The sum is kept in a
/// `u32` and folded at the end; the fast path adds a few dozen words, far from overflowing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    pub const fn new() -> Self {
        Self(0)
    }

    /// Accounts for word `word` entering the checksummed data.
    #[inline(always)]
    pub fn add(&mut self, word: u16) {
        self.0 += word as u32;
    }

    /// Accounts for word `word` leaving the checksummed data (adds its complement, `~m`).
    #[inline(always)]
    pub fn remove(&mut self, word: u16) {
        self.0 += !word as u32;
    }

    /// Accounts for `old` being replaced by `new` at the same (even) offset.
    #[inline(always)]
    pub fn replace(&mut self, old: u16, new: u16) {
        self.remove(old);
        self.add(new);
    }

    /// Accounts for a 32-bit word (two checksum words) being replaced.
    #[inline(always)]
    pub fn replace32(&mut self, old: u32, new: u32) {
        self.replace(old as u16, new as u16);
        self.replace((old >> 16) as u16, (new >> 16) as u16);
    }

    /// Accounts for an IPv6 address (four 32-bit words) being replaced.
    #[inline(always)]
    pub fn replace128(&mut self, old: &[u32; 4], new: &[u32; 4]) {
        self.replace32(old[0], new[0]);
        self.replace32(old[1], new[1]);
        self.replace32(old[2], new[2]);
        self.replace32(old[3], new[3]);
    }

    /// Accounts for an address of either family leaving the checksummed data (a pseudo-header
    /// address when the datagram changes family): IPv4 is the first word only.
    #[inline(always)]
    pub fn remove_address(&mut self, ip: &[u32; 4], v6: bool) {
        self.remove(ip[0] as u16);
        self.remove((ip[0] >> 16) as u16);
        if v6 {
            for w in &ip[1..] {
                self.remove(*w as u16);
                self.remove((*w >> 16) as u16);
            }
        }
    }

    /// Accounts for an address of either family entering the checksummed data.
    #[inline(always)]
    pub fn add_address(&mut self, ip: &[u32; 4], v6: bool) {
        self.add(ip[0] as u16);
        self.add((ip[0] >> 16) as u16);
        if v6 {
            for w in &ip[1..] {
                self.add(*w as u16);
                self.add((*w >> 16) as u16);
            }
        }
    }

    /// Accounts for one byte leaving the data; `even_offset` says whether it sat at an even
    /// offset from the start of the checksummed data (the first byte of its word).
    #[inline(always)]
    pub fn remove_byte(&mut self, byte: u8, even_offset: bool) {
        let word = if even_offset {
            u16::from_ne_bytes([byte, 0])
        } else {
            u16::from_ne_bytes([0, byte])
        };
        self.remove(word);
    }

    /// Applies the delta to `check`, the checksum field currently in the packet:
    /// `HC' = ~(~HC + ~m + m')` (RFC 1624 eqn. 3).
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(!check as u32 + fold(self.0) as u32)
    }

    /// Like [`Delta::apply`] for a UDP checksum: a result of zero is sent as `0xffff`, because
    /// zero means "no checksum" (RFC 768).
    #[inline(always)]
    pub fn apply_udp(self, check: u16) -> u16 {
        match self.apply(check) {
            0 => 0xffff,
            sum => sum,
        }
    }
}

/// A host-order 16-bit value (a length) as the native word of its network-order bytes.
#[inline(always)]
pub fn word(value: u16) -> u16 {
    u16::from_ne_bytes(value.to_be_bytes())
}

/// The header checksum of an IPv4 header without options whose fields are the relay's own:
/// version 4, IHL 5, TOS 0, IP id 0, DF, TTL `ttl`, protocol UDP, and the given total length
/// (a native word, see [`word`]) and addresses (network-order words). Computed from scratch:
/// every field is known, so no incremental update is needed.
#[inline(always)]
pub fn ipv4_header_checksum(total_len: u16, ttl: u8, src: u32, dst: u32) -> u16 {
    const UDP: u8 = 17;
    let mut sum = u16::from_ne_bytes([0x45, 0]) as u32;
    sum += total_len as u32;
    sum += word(0x4000) as u32;
    sum += u16::from_ne_bytes([ttl, UDP]) as u32;
    sum += (src & 0xffff) + (src >> 16);
    sum += (dst & 0xffff) + (dst >> 16);
    !fold(sum)
}

/// Folds a 32-bit one's-complement sum into 16 bits (end-around carry).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 checksum of `data` plus an initial sum, computed the slow way.
    pub fn full(initial: u32, data: &[u8]) -> u16 {
        let mut sum = initial as u64;
        for chunk in data.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += word as u64;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn ipv4_header_checksum_matches_full_computation() {
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let r = rng.next();
            let (src, dst) = ((r >> 32) as u32, r as u32);
            let len = (rng.next() % 65_535) as u16;
            let mut header = [0u8; 20];
            header[0] = 0x45;
            header[2..4].copy_from_slice(&len.to_be_bytes());
            header[6] = 0x40;
            header[8] = 64;
            header[9] = 17;
            header[12..16].copy_from_slice(&src.to_ne_bytes());
            header[16..20].copy_from_slice(&dst.to_ne_bytes());
            let expected = full(0, &header);
            let got = ipv4_header_checksum(word(len), 64, src, dst);
            assert_eq!(u16::from_be_bytes(got.to_ne_bytes()), expected);
        }
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0u8; N];
            for b in &mut out {
                *b = self.next() as u8;
            }
            out
        }
        pub fn vec(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn ne(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn ne32(bytes: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    /// Incremental and full results agree, up to one's complement's two zeros.
    fn assert_same(incremental_ne: u16, full_be: u16) {
        let incremental = u16::from_be_bytes(incremental_ne.to_ne_bytes());
        assert!(
            incremental == full_be || (incremental | full_be == 0xffff),
            "incremental {incremental:#06x} recomputed {full_be:#06x}"
        );
    }

    #[test]
    fn replacing_words_matches_recomputation() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let mut data = rng.vec(40);
            let before = full(0, &data);
            let old32 = ne32(&data, 8);
            let old16 = ne(&data, 20);
            let old128: [u32; 4] = core::array::from_fn(|i| ne32(&data, 24 + 4 * i));
            let new: [u8; 22] = rng.bytes();
            data[8..12].copy_from_slice(&new[..4]);
            data[20..22].copy_from_slice(&new[4..6]);
            data[24..40].copy_from_slice(&new[6..22]);
            let mut delta = Delta::new();
            delta.replace32(old32, ne32(&data, 8));
            delta.replace(old16, ne(&data, 20));
            delta.replace128(&old128, &core::array::from_fn(|i| ne32(&data, 24 + 4 * i)));
            let before_ne = u16::from_ne_bytes(before.to_be_bytes());
            assert_same(delta.apply(before_ne), full(0, &data));
        }
    }

    #[test]
    fn removing_a_prefix_and_trailing_odd_bytes_matches_recomputation() {
        let mut rng = Rng::new(11);
        for len in 0..64usize {
            for pad in 0..4usize {
                let data = rng.vec(8 + 4 + len + pad);
                let before = full(0, &data);
                let mut delta = Delta::new();
                delta.remove(ne(&data, 8));
                delta.remove(ne(&data, 10));
                for i in 0..pad {
                    let at = 8 + 4 + len + i;
                    delta.remove_byte(data[at], at % 2 == 0);
                }
                let mut after = data[..8].to_vec();
                after.extend_from_slice(&data[12..12 + len]);
                let before_ne = u16::from_ne_bytes(before.to_be_bytes());
                assert_same(delta.apply(before_ne), full(0, &after));
            }
        }
    }

    #[test]
    fn inserting_a_prefix_matches_recomputation() {
        let mut rng = Rng::new(13);
        for len in 0..64usize {
            let data = rng.vec(8 + len);
            let header: [u8; 4] = rng.bytes();
            let before = full(0, &data);
            let mut delta = Delta::new();
            delta.add(ne(&header, 0));
            delta.add(ne(&header, 2));
            let mut after = data[..8].to_vec();
            after.extend_from_slice(&header);
            after.extend_from_slice(&data[8..]);
            let before_ne = u16::from_ne_bytes(before.to_be_bytes());
            assert_same(delta.apply(before_ne), full(0, &after));
        }
    }

    #[test]
    fn lengths_are_words_of_their_network_bytes() {
        assert_eq!(word(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }

    #[test]
    fn udp_zero_is_sent_as_all_ones() {
        // A delta that brings the sum to "zero" must not produce the no-checksum value.
        let mut delta = Delta::new();
        delta.remove(0x1234);
        delta.add(0x1234);
        assert_eq!(delta.apply_udp(0xffff), 0xffff);
        assert_eq!(delta.apply_udp(0x0000), 0xffff);
    }

    #[test]
    fn fold_carries_twice() {
        assert_eq!(fold(0xffff + 0xffff), 0xffff);
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold(0), 0);
    }
}
