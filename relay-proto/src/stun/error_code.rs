//! The ERROR-CODE values this relay sends, by name (RFC 8489 §14.8, RFC 8656 §19), so handlers
//! never carry bare numbers and every code has exactly one reason phrase.

use super::ErrorCode;

/// A STUN/TURN error response code with its reason phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StunErrorCode {
    /// 300 (RFC 8489 §14.8): the client should contact the ALTERNATE-SERVER.
    TryAlternate,
    /// 400 (RFC 8489 §14.8): malformed request.
    BadRequest,
    /// 401 (RFC 8489 §14.8): missing or wrong credentials.
    Unauthenticated,
    /// 403 (RFC 8656 §19): forbidden by policy (e.g. the peer address).
    Forbidden,
    /// 420 (RFC 8489 §14.8): a comprehension-required attribute was not understood.
    UnknownAttribute,
    /// 437 (RFC 8656 §19): no allocation, or another one, on this 5-tuple.
    AllocationMismatch,
    /// 438 (RFC 8489 §14.8): the NONCE is no longer valid.
    StaleNonce,
    /// 440 (RFC 8656 §19): no relayed address of the requested family.
    AddressFamilyNotSupported,
    /// 441 (RFC 8656 §19): credentials differ from those that created the allocation.
    WrongCredentials,
    /// 442 (RFC 8656 §19): REQUESTED-TRANSPORT other than UDP.
    UnsupportedTransportProtocol,
    /// 443 (RFC 8656 §19): the peer's family has no relayed address in the allocation.
    PeerAddressFamilyMismatch,
    /// 486 (RFC 8656 §19): the user has its maximum number of allocations.
    AllocationQuotaReached,
    /// 500 (RFC 8489 §14.8): a temporary server error.
    ServerError,
    /// 508 (RFC 8656 §19): out of ports, allocations, permissions or channels.
    InsufficientCapacity,
}

impl StunErrorCode {
    /// Every named code, in numeric order.
    pub const ALL: [StunErrorCode; 14] = [
        StunErrorCode::TryAlternate,
        StunErrorCode::BadRequest,
        StunErrorCode::Unauthenticated,
        StunErrorCode::Forbidden,
        StunErrorCode::UnknownAttribute,
        StunErrorCode::AllocationMismatch,
        StunErrorCode::StaleNonce,
        StunErrorCode::AddressFamilyNotSupported,
        StunErrorCode::WrongCredentials,
        StunErrorCode::UnsupportedTransportProtocol,
        StunErrorCode::PeerAddressFamilyMismatch,
        StunErrorCode::AllocationQuotaReached,
        StunErrorCode::ServerError,
        StunErrorCode::InsufficientCapacity,
    ];

    /// The numeric code (class * 100 + number).
    pub const fn code(self) -> u16 {
        match self {
            StunErrorCode::TryAlternate => 300,
            StunErrorCode::BadRequest => 400,
            StunErrorCode::Unauthenticated => 401,
            StunErrorCode::Forbidden => 403,
            StunErrorCode::UnknownAttribute => 420,
            StunErrorCode::AllocationMismatch => 437,
            StunErrorCode::StaleNonce => 438,
            StunErrorCode::AddressFamilyNotSupported => 440,
            StunErrorCode::WrongCredentials => 441,
            StunErrorCode::UnsupportedTransportProtocol => 442,
            StunErrorCode::PeerAddressFamilyMismatch => 443,
            StunErrorCode::AllocationQuotaReached => 486,
            StunErrorCode::ServerError => 500,
            StunErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase sent with the code (the RFCs' recommended phrases).
    pub const fn reason(self) -> &'static str {
        match self {
            StunErrorCode::TryAlternate => "Try Alternate",
            StunErrorCode::BadRequest => "Bad Request",
            StunErrorCode::Unauthenticated => "Unauthenticated",
            StunErrorCode::Forbidden => "Forbidden",
            StunErrorCode::UnknownAttribute => "Unknown Attribute",
            StunErrorCode::AllocationMismatch => "Allocation Mismatch",
            StunErrorCode::StaleNonce => "Stale Nonce",
            StunErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            StunErrorCode::WrongCredentials => "Wrong Credentials",
            StunErrorCode::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            StunErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            StunErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            StunErrorCode::ServerError => "Server Error",
            StunErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }

    /// The named code for `code`, if it is one of them.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The ERROR-CODE (or ADDRESS-ERROR-CODE) attribute value.
    pub const fn to_error_code(self) -> ErrorCode<'static> {
        ErrorCode {
            code: self.code(),
            reason: self.reason(),
        }
    }
}

impl From<StunErrorCode> for ErrorCode<'static> {
    fn from(code: StunErrorCode) -> Self {
        code.to_error_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_rfc_numbers_in_order_and_round_trip() {
        let numbers: Vec<u16> = StunErrorCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(
            numbers,
            [300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508]
        );
        for code in StunErrorCode::ALL {
            assert_eq!(StunErrorCode::from_code(code.code()), Some(code));
            let value = ErrorCode::from(code);
            assert_eq!((value.code, value.reason), (code.code(), code.reason()));
        }
        assert_eq!(StunErrorCode::from_code(499), None);
        assert_eq!(
            StunErrorCode::UnsupportedTransportProtocol.reason(),
            "Unsupported Transport Protocol"
        );
    }
}
